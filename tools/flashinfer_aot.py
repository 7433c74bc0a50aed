"""Builds ahead of time the flashinfer modules the engine's attention uses, on a machine with nvcc and no GPU, so
that a GPU machine loads them instead of JIT-compiling them (minutes) or failing (no nvcc, ninja or headers).

    python tools/flashinfer_aot.py OUT [--head-dims 64 128] [--arch 9.0] [--jobs 2]

engine/attention/flashinfer.py runs FA2 for prefill and for tensor-core decode, which share one module per (dtype,
head_dim): `batch_prefill_with_kv_cache_dtype_q_bf16_..._head_dim_qk_{D}_...`. This builds the bf16 ones for the
given head sizes (SmolLM2 and Qwen2.5-0.5B / 1.5B: 64; Llama 3.1 and Qwen2.5-Math-7B: 128) and copies each
`<name>.so` to OUT/<name>/<name>.so. On the GPU machine, copy OUT's folders into the installed package's
`flashinfer/data/aot/`, where flashinfer looks before it compiles (`bench/gpu_check.py --device-run` does).

Needs flashinfer-python 0.6.18.post1 importable (with apache-tvm-ffi, nvidia-ml-py, tabulate), nvcc and ninja.
CUDA_HOME must name the toolkit when `which nvcc` is a wrapper outside it (flashinfer derives it from nvcc's path).
Each module is built for one architecture (flashinfer turns 9.0 into sm_90a: H100 / H200). Its link names
libcuda (the driver): on a machine without a driver an empty stub with the driver's soname stands in for it (the
GPU machine's driver provides the real one when the module loads).
"""
import argparse
import ctypes.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def engine_module_args(head_dim: int) -> tuple:
    """get_batch_prefill_module's arguments for what the engine plans: bf16 q / kv / out, int32 indices, no
    positional encoding, sliding window, soft cap or fp16 q.k reduction."""
    import torch
    return ("fa2", torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.int32, head_dim, head_dim, 0, False, False,
            False)


def link_stub_for_libcuda(folder: Path) -> None:
    """Where no libcuda.so can be linked against (no driver, no toolkit stub), an empty one named libcuda.so.1."""
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    if ctypes.util.find_library("cuda") or any((home / d / "libcuda.so").exists() for d in ("lib64/stubs", "lib64")):
        return
    source = folder / "empty.c"
    source.write_text("")
    subprocess.run(["cc", "-shared", "-o", str(folder / "libcuda.so"), "-Wl,-soname,libcuda.so.1", str(source)],
                   check=True)
    os.environ["LIBRARY_PATH"] = f"{folder}:{os.environ['LIBRARY_PATH']}" if os.environ.get("LIBRARY_PATH") \
        else str(folder)
    print(f"no libcuda.so to link against: an empty stub in {folder} stands in for the driver's", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for <module>/<module>.so")
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--arch", default="9.0", help="FLASHINFER_CUDA_ARCH_LIST (9.0 builds sm_90a)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel nvcc jobs")
    args = ap.parse_args()
    os.environ["FLASHINFER_CUDA_ARCH_LIST"] = args.arch  # before flashinfer reads it
    os.environ["MAX_JOBS"] = str(args.jobs)
    from flashinfer.jit.attention import gen_batch_prefill_module
    args.out.mkdir(parents=True, exist_ok=True)
    link_stub_for_libcuda(Path(tempfile.mkdtemp(prefix="libcuda_stub_")))
    for head_dim in args.head_dims:
        spec = gen_batch_prefill_module(*engine_module_args(head_dim))
        t0 = time.perf_counter()
        spec.build(verbose=False)
        built = spec.jit_library_path
        target = args.out / spec.name / f"{spec.name}.so"
        target.parent.mkdir(exist_ok=True)
        shutil.copy2(built, target)
        print(f"{spec.name}: {time.perf_counter() - t0:.0f} s, {target.stat().st_size / 2**20:.1f} MiB -> {target}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
