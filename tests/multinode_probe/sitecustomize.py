"""Test instrumentation for tests/test_multinode.py, loaded by every Python process whose PYTHONPATH starts here.

In a trainer process (RANK set) with ETTRL_PROBE_DIR set it records, under that directory and never inside the
watched run folder (ETTRL_PROBE_WATCH):
  digest-rank{R}.jsonl  after each train step: sha256 of the policy's and of the engine's weights, RANK, LOCAL_RANK
  writes-rank{R}.jsonl  every file or directory the process creates, writes, renames or deletes under the run folder
                        (Python's audit events, plus torch.save, whose C++ writer opens files outside Python)
Nothing here changes what the trainer does."""
import hashlib
import json
import os
import sys

PROBE, WATCH, RANK = os.environ.get("ETTRL_PROBE_DIR"), os.environ.get("ETTRL_PROBE_WATCH"), os.environ.get("RANK")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_busy = False


def _record(kind: str, row: dict):
    global _busy
    _busy = True
    try:
        with open(os.path.join(PROBE, f"{kind}-rank{RANK}.jsonl"), "a") as f:
            f.write(json.dumps({"rank": int(RANK), **row}) + "\n")
    finally:
        _busy = False


def _watched(path) -> str | None:
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    if not isinstance(path, (str, os.PathLike)):
        return None
    full = os.path.abspath(os.fspath(path))
    return full if full == WATCH or full.startswith(WATCH + os.sep) else None


def _audit(event: str, args):
    if _busy:
        return
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & WRITE_FLAGS)
        paths = [path] if writes else []
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
        paths = [args[0]]
    elif event == "os.rename":
        paths = [args[0], args[1]]
    else:
        return
    for p in paths:
        full = _watched(p)
        if full is not None:
            _record("writes", {"event": event, "path": full})


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().cpu().float().numpy().tobytes())
    return h.hexdigest()


def _install():
    import torch

    from ettrl.trainer import Trainer

    save = torch.save

    def recorded_save(obj, f, *args, **kwargs):
        full = _watched(f) if isinstance(f, (str, os.PathLike)) else None
        if full is not None:
            _record("writes", {"event": "torch.save", "path": full})
        return save(obj, f, *args, **kwargs)

    torch.save = recorded_save
    step = Trainer.train_step

    def recorded_step(self):
        record = step(self)
        views = self.llm.engine.runner.model.hf_parameter_views()
        _record("digest", {"local_rank": int(os.environ["LOCAL_RANK"]), "step": record["step"],
                           "digest": _digest(self.model.state_dict()), "engine_digest": _digest(views)})
        return record

    Trainer.train_step = recorded_step


if PROBE and WATCH and RANK is not None:
    sys.addaudithook(_audit)
    _install()
