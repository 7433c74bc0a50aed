"""Which matmul path the CPU linears take, chosen by measurement once per machine, stored, and then fixed.

Candidates (packed_linear.py): "panel" (our panel_linear, AVX-512 BF16 CPUs), "onednn" (oneDNN with a pre-packed
weight; on AMX CPUs it uses the matrix engine) and "torch" (plain F.linear). Each of a model's weight shapes is
timed at a few batch sizes (BATCH_BUCKETS) once per machine: CPU model and features, torch version and thread count.
The timings go to a JSON file in the cache directory (engine.model_files.default_cache_dir(), ETTRL_CACHE), and the
choice is a pure function of that file, so the same machine and config always take the same path: a seed's tokens
never depend on timing noise. A missing, corrupt or incomplete file is measured (again) and rewritten.

One kernel serves all of a model's matmuls (the sum of its shapes' times): a row's path must not change with the
batch size, and the fused decode-layer stack (decode_layers.py) needs every layer weight in panels.

batch_invariant (EngineConfig, default True): only kernels whose row results are independent of the number of rows,
bit for bit, are eligible: panel_linear (fixed accumulation order). oneDNN and MKL pick their blocking by the row
count (on AMX CPUs the bf16 result of a row changes between 16 and 64 rows), so they are chosen only with
batch_invariant=False, or on CPUs without panel_linear (AVX2-only, AVX-512 without BF16), where no invariant kernel
exists and the engine warns that a seed's tokens may depend on the batch.
"""
import functools
import hashlib
import json
import os
import platform
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from engine.layers.packed_linear import (
    PACKED_DTYPES,
    linear,
    pack,
    packing_supported,
    panels_supported,
)

KERNELS = ("panel", "onednn", "torch")  # also the tie-break order
MATMUL_KERNELS = ("auto", *KERNELS)
BATCH_BUCKETS = (1, 8, 64)
BATCH_INVARIANT = frozenset({"panel"})
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_fp16",
                "amx_tile", "amx_bf16", "amx_int8")
# Each (shape, kernel, bucket) runs MIN_REPEATS times, then on until MEASURE_SECONDS or MAX_REPEATS; the fastest run
# counts (other work on a shared machine only ever adds time, and descheduled OpenMP threads add a lot).
MIN_REPEATS, MAX_REPEATS, MEASURE_SECONDS = 5, 100, 0.1


@functools.cache
def cpu_description() -> dict[str, Any]:
    """CPU model name and the matmul-relevant feature flags (from /proc/cpuinfo on Linux)."""
    name, flags = platform.processor() or platform.machine(), set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": name, "features": [f for f in CPU_FEATURES if f in flags]}


def machine_key() -> dict[str, Any]:
    return {**cpu_description(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def choice_file(cache_dir: str | Path | None = None) -> Path:
    from engine.model_files import default_cache_dir
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha256(json.dumps(machine_key(), sort_keys=True).encode()).hexdigest()[:16]
    return cache / "matmul" / f"{digest}.json"


def available_kernels(dtype: torch.dtype) -> list[str]:
    probe = torch.empty(16, 16, dtype=dtype)
    found = [k for k, ok in (("panel", panels_supported(probe)), ("onednn", packing_supported(probe))) if ok]
    return [*found, "torch"]


class MatmulModel(Protocol):
    """What model_shapes reads of a model (llama.CausalLM)."""

    @property
    def lm_head(self) -> torch.Tensor:
        """The output projection [vocab, hidden]."""

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of every weight (torch.nn.Module's)."""


def model_shapes(model: MatmulModel) -> list[tuple[int, int]]:
    """(out, in) of every matmul weight of an engine CausalLM: the layers' 2-D weights and the lm_head."""
    shapes = {(p.shape[0], p.shape[1]) for n, p in model.named_parameters() if p.dim() == 2 and n != "embed_tokens"}
    shapes.add((model.lm_head.shape[0], model.lm_head.shape[1]))
    return sorted(shapes)


def resolve_kernel(shapes: list[tuple[int, int]], dtype: torch.dtype, kernel: str = "auto",
                   batch_invariant: bool = True, cache_dir: str | Path | None = None) -> str:
    """The kernel for these weight shapes: `kernel` itself unless "auto", else the stored choice (measured once)."""
    if kernel not in MATMUL_KERNELS:
        raise ValueError(f"matmul_kernel must be one of {MATMUL_KERNELS}, got {kernel!r}")
    available = available_kernels(dtype) if dtype in PACKED_DTYPES else ["torch"]
    if kernel != "auto":
        if kernel not in available:
            raise ValueError(f"matmul_kernel={kernel!r} is not available for {dtype} on this CPU "
                             f"({cpu_description()['cpu']}); available: {available}. Use 'auto'.")
        return kernel
    eligible = [k for k in available if k in BATCH_INVARIANT] if batch_invariant else available
    if batch_invariant and not eligible:
        _warn_not_invariant(tuple(available))
        eligible = available
    if len(eligible) == 1:
        return eligible[0]
    timings = stored_timings(shapes, dtype, eligible, cache_dir)
    return min(eligible, key=lambda k: (sum(sum(timings[_shape_key(s, dtype)][k].values()) for s in shapes),
                                        KERNELS.index(k)))


@functools.cache
def _warn_not_invariant(available: tuple[str, ...]) -> None:
    warnings.warn(f"no batch-invariant matmul on this CPU ({cpu_description()['cpu']}, no AVX-512 BF16 or "
                  f"ETTRL_NO_PANEL_LINEAR set): using the fastest of {list(available)}; a row's result, and so a "
                  f"seed's tokens, may depend on the batch it runs in", stacklevel=3)


def _shape_key(shape: tuple[int, int], dtype: torch.dtype) -> str:
    return f"{str(dtype).removeprefix('torch.')} {shape[0]}x{shape[1]}"


def stored_timings(shapes: list[tuple[int, int]], dtype: torch.dtype, kernels: list[str],
                   cache_dir: str | Path | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """{shape key: {kernel: {bucket: seconds}}} for these shapes and kernels: read from the choice file, measuring
    (under a file lock, once per machine) whatever it lacks or cannot parse."""
    from engine.model_files import _file_lock
    path = choice_file(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.with_suffix(".lock")):
        data = _read(path)
        missing = [s for s in shapes if not _complete(data["timings"].get(_shape_key(s, dtype)), kernels)]
        for shape in missing:
            entry = data["timings"].setdefault(_shape_key(shape, dtype), {})
            for k in kernels:
                if not _complete({k: entry.get(k)}, [k]):
                    entry[k] = measure(shape, dtype, k)
        if missing:
            _write(path, data)
    return data["timings"]


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        if data.get("machine") == machine_key() and isinstance(data.get("timings"), dict):
            return data
    except (OSError, ValueError, AttributeError):
        pass
    return {"machine": machine_key(), "buckets": list(BATCH_BUCKETS), "timings": {}}


def _complete(entry: Any, kernels: list[str]) -> bool:
    return isinstance(entry, dict) and all(
        isinstance(entry.get(k), dict) and all(isinstance(entry[k].get(str(b)), (int, float)) for b in BATCH_BUCKETS)
        for k in kernels)


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


@torch.inference_mode()
def measure(shape: tuple[int, int], dtype: torch.dtype, kernel: str) -> dict[str, float]:
    """{bucket: seconds of the fastest product} for a random weight of this shape; inf where the kernel
    declines."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(shape, generator=gen) * shape[1] ** -0.5).to(dtype)
    packed = pack(weight, None, kernel)
    if kernel != "torch" and packed is None:
        return {str(b): float("inf") for b in BATCH_BUCKETS}
    out = {}
    for rows in BATCH_BUCKETS:
        x = torch.randn(rows, shape[1], generator=gen).to(dtype)
        linear(x, weight, None, packed)
        times: list[float] = []
        deadline = time.perf_counter() + MEASURE_SECONDS
        while len(times) < MIN_REPEATS or (len(times) < MAX_REPEATS and time.perf_counter() < deadline):
            start = time.perf_counter()
            linear(x, weight, None, packed)
            times.append(time.perf_counter() - start)
        out[str(rows)] = min(times)
    return out
