"""Every environment variable the engine and its kernels read; the engine reads them here and nowhere else.

Fast paths are switched per engine by EngineConfig fields (pack_weights, fused_ops, fused_decode, attention_backend,
matmul_kernel, batch_invariant). What is left here is process-wide:

Ours
  ETTRL_CACHE=dir          where the built-in model is converted and downloaded, and matmul timings are kept
                           (default ~/.cache/ettrl): cache_dir().
  ETTRL_NO_AVX512=1        the C++ kernels (ettrl_kernels._C) act as on a CPU without AVX-512: the paged decode
                           attention runs its portable kernel.
  ETTRL_NO_AVX512_BF16=1   ... without AVX512_BF16: the AVX-512 decode attention computes q.k in fp32 for bf16
                           caches (no vdpbf16ps).
  ETTRL_NO_PANEL_LINEAR=1  ... without panel_linear: packing gives oneDNN's layout, and the fused decode layer
                           stack, which needs panels, is off.
  The three ETTRL_NO_* switches are read by the extension itself (csrc/cpu_features.h), once per process at a
  kernel's first call, like the CPU's own feature flags they stand in for: set them before the process starts
  (the tests run the other kernels of an AVX-512 machine that way, in a subprocess). cpu_kernel_switches()
  reports them. ETTRL_NO_NINJA=1 (setup.py only) builds the extension without ninja.
  ETTRL_API_KEY=key        python -m engine.serve: the default of --api-key (api_key()).
Other tools' that we honour
  HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE (Hugging Face): resolve_model downloads nothing: hub_offline().
  TRITON_INTERPRET=1 (Triton): run Triton kernels on the CPU, as the tests do; ettrl_kernels.backend reads it
  to accept backend="triton" on CPU tensors (the kernels package sits below the engine, so not through here).
"""
import os
from pathlib import Path

CPU_KERNEL_SWITCHES = ("ETTRL_NO_AVX512", "ETTRL_NO_AVX512_BF16", "ETTRL_NO_PANEL_LINEAR")
TRUE_WORDS = ("1", "ON", "YES", "TRUE")


def cache_dir() -> Path:
    return Path(os.environ.get("ETTRL_CACHE") or "~/.cache/ettrl").expanduser()


def api_key() -> str | None:
    return os.environ.get("ETTRL_API_KEY")


def cpu_kernel_switches() -> dict[str, bool]:
    """Each ETTRL_NO_* switch and whether it is on, by the extension's rule: set, non-empty and not "0"."""
    return {name: os.environ.get(name, "0") not in ("", "0") for name in CPU_KERNEL_SWITCHES}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set to a true word (or huggingface_hub's own reading of them)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(f.upper() in TRUE_WORDS for f in flags)
