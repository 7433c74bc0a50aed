"""Large CPU tensors backed by transparent huge pages where the OS offers them (Linux, THP in `madvise` mode).

The KV pool is hundreds of MB read in 6-12 KB blocks scattered over it; with 4 KB pages nearly every block costs
TLB misses. 2 MB pages make the CPU decode attention faster, and the streaming of the lm_head's panel-packed
weight (56 MB every step) too (docs/benchmarks.md).
Elsewhere (other OS, THP off, CUDA) this is a plain torch.zeros.
"""
import ctypes
import sys

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


def _madvise_hugepage(address: int, length: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.zeros(shape), on huge pages where possible: the pages are advised before they are first touched."""
    device = torch.device(device)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or not sys.platform.startswith("linux") or nbytes < HUGE_PAGE:
        return torch.zeros(shape, dtype=dtype, device=device)
    buffer = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -buffer.data_ptr() % HUGE_PAGE
    _madvise_hugepage(buffer.data_ptr() + start, nbytes // HUGE_PAGE * HUGE_PAGE)
    return buffer[start:start + nbytes].view(dtype).view(shape).zero_()
