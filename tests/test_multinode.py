"""Our trainer across nodes with the standard launcher: `python -m ettrl.run` (DeepSpeed ZeRO-2 over gloo) as two
"nodes" on this machine (torchrun --nnodes 2 --nproc_per_node 1 --node_rank 0|1, master on loopback), checked
against the single-node two-rank run, and the model cache under two processes converting at once.

Every process of a run loads tests/multinode_probe/sitecustomize.py (PYTHONPATH), which records, outside the run
folder, each step's weight digest per rank and every file the process creates, writes, renames or deletes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_tiny_task  # noqa: E402

pytest.importorskip("deepspeed")

from test_deepspeed import free_port  # noqa: E402

PROBE = Path(__file__).parent / "multinode_probe"
TIMING = {"wall_s", "rollout_s", "score_s", "update_s", "step_s", "time_s"}


def config(root: Path) -> dict:
    # RENT's reward (minus the response entropy) spreads in every group, so each step moves the weights
    return {"name": "tiny", "method": "rent", "save_every": 0, "model": {"name": str(root / "model")},
            "data": {"train": str(root / "p.jsonl"), "eval": "", "prompt": "plain"},
            "rollout": {"n_votes": 6, "n_train": 4, "max_tokens": 12, "temperature": 1.0,
                        "last_number_fallback": True},
            "trainer": {"backend": "deepspeed", "zero_stage": 2, "prompts_per_step": 2, "micro_batch_size": 2,
                        "max_steps": 2, "lr": 1e-3, "warmup_ratio": 0.0}}


def launch(root: Path, tag: str, nodes: int) -> tuple[Path, Path]:
    """Runs ettrl.run as `nodes` torchrun launchers of 2 / nodes processes each; returns (run dir, probe dir)."""
    (root / "c.yaml").write_text(yaml.safe_dump(config(root)))
    run_dir, probe = root / f"node0-{tag}" / "run", root / f"probe-{tag}"  # --run-dir run: relative to node 0
    probe.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ETTRL_PROBE_DIR": str(probe), "ETTRL_PROBE_WATCH": str(run_dir),
           "PYTHONPATH": os.pathsep.join([str(PROBE), os.environ.get("PYTHONPATH", "")])}
    port = free_port()
    common = ["--nproc_per_node", str(2 // nodes), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    if nodes > 1:
        common = ["--nnodes", str(nodes), *common]
    args = ["-m", "ettrl.run", "--config", str(root / "c.yaml"), "--run-dir", "run"]
    procs = []
    for node in range(nodes):
        rank = ["--node_rank", str(node)] if nodes > 1 else []
        cwd = root / f"node{node}-{tag}"  # each "node" its own working directory
        cwd.mkdir()
        procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *common, *rank, *args],
                                      cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"{tag}: {err[-3000:]}"
    return run_dir, probe


def probe_rows(probe: Path, kind: str) -> list[dict]:
    rows = []
    for f in sorted(probe.glob(f"{kind}-*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines()]
    return rows


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = make_tiny_task(tmp_path_factory.mktemp("multinode"), num_problems=4, data_file="p.jsonl")
    return launch(root, "two-nodes", nodes=2), launch(root, "one-node", nodes=1)


def test_two_nodes_hold_equal_weights_after_each_step(runs):
    (_, probe), _ = runs
    digests = probe_rows(probe, "digest")
    assert sorted((r["rank"], r["local_rank"], r["step"]) for r in digests) == [(0, 0, 1), (0, 0, 2), (1, 0, 1),
                                                                                (1, 0, 2)]
    by_step = {}
    for r in digests:
        by_step.setdefault(r["step"], set()).add(r["digest"])
    assert all(len(d) == 1 for d in by_step.values()), "the ranks' weights differ after a step"
    engines = {}
    for r in digests:
        engines.setdefault(r["step"], set()).add(r["engine_digest"])
    assert all(len(d) == 1 for d in engines.values()), "the ranks' engines hold different weights after a step"
    assert len({next(iter(d)) for d in by_step.values()}) == 2, "each step must move the weights"


def test_two_nodes_give_the_metrics_of_one_node_with_two_ranks(runs):
    (two_nodes, probe2), (one_node, probe1) = runs
    a, b = metrics(two_nodes), metrics(one_node)
    assert [r["type"] for r in a] == [r["type"] for r in b] and [r["step"] for r in a if r["type"] == "train"] == [1, 2]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            same = x[k] == y[k] if isinstance(x[k], str) else x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-9)
            assert same, (k, x[k], y[k])
    last = lambda p: {r["step"]: r["digest"] for r in probe_rows(p, "digest") if r["rank"] == 0}  # noqa: E731
    assert last(probe2) == last(probe1), "the same weights as the single-node run after each step"


def test_only_global_rank_0_writes_the_run_folder(runs):
    """Both nodes' processes have LOCAL_RANK 0; writes into the run folder follow the global rank. Rank 1 writes
    one file: its own optimizer state in the checkpoint (a multi-node run's folder must be on a filesystem the
    nodes share)."""
    (run_dir, probe), _ = runs
    writes = probe_rows(probe, "writes")
    rank1 = {(w["event"], Path(w["path"]).relative_to(run_dir).as_posix()) for w in writes if w["rank"] == 1}
    assert rank1 == {("torch.save", "checkpoints/.tmp-step-000002/rank1.pt")}
    rank0 = {Path(w["path"]).relative_to(run_dir).as_posix() for w in writes if w["rank"] == 0}
    assert {"config.yaml", "metrics.jsonl", "summary.json"} <= rank0
    assert (run_dir / "checkpoints" / "step-000002" / "rank1.pt").is_file()
    assert not any((run_dir.parent.parent / "node1-two-nodes").iterdir()), "node 1 wrote in its working directory"


CONVERT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from engine import gguf_convert, model_files
from tiny_models import make_tiny_policy

def fetch(gguf_dir):
    return Path(gguf_dir) / "fake.gguf"

def convert(gguf, out_dir):
    with open({log!r}, "a") as f:
        f.write("convert\\n")
    time.sleep(2)  # the other process arrives meanwhile
    make_tiny_policy(Path(out_dir))

gguf_convert.fetch_gguf, gguf_convert.convert_gguf = fetch, convert
print(model_files.resolve_model(model_files.DEFAULT_MODEL, {cache!r}))
"""


def test_two_processes_converting_the_default_model_at_once(tmp_path):
    """Two processes resolve the built-in model into an empty cache at the same moment (the GGUF download and
    conversion stubbed by a slow tiny model): one converts, both get the complete directory."""
    log, cache = tmp_path / "conversions.log", tmp_path / "cache"
    code = CONVERT.format(tests=str(Path(__file__).parent), log=str(log), cache=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    target = cache / "models" / "smollm2-135m-instruct"
    assert [Path(out.strip().splitlines()[-1]) for out, _ in outs] == [target, target]
    assert log.read_text() == "convert\n"
    assert (target / ".ettrl-complete").is_file() and (target / "config.json").is_file()
    assert not list(target.parent.glob(".smollm2-135m-instruct.tmp-*"))


def test_a_rank_that_cannot_see_the_checkpoint_directory_says_why(tmp_path):
    """Rank 0 creates the checkpoint's temporary directory; on a node without the shared filesystem it is not
    there, and the rank says what a multi-node run needs rather than failing inside torch.save."""
    from ettrl.checkpoint import save_checkpoint

    with pytest.raises(RuntimeError, match="rank 1 cannot see .*filesystem every node shares"):
        save_checkpoint(tmp_path / "run", 2, None, None, None, {}, {"step": 2}, rank=1)
    assert not (tmp_path / "run").exists()
