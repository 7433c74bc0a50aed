"""Large CPU tensors backed by transparent huge pages where the OS offers them (Linux, THP in `madvise` mode).

The KV pool is hundreds of MB read in 6-12 KB blocks scattered over it; with 4 KB pages nearly every block costs
TLB misses. 2 MB pages make the CPU decode attention faster, and the streaming of the lm_head's panel-packed
weight (56 MB every step) too (docs/benchmarks.md).
The memory is an anonymous mapping of its own, so freeing the tensor (LLM.sleep, update_weights' repacking)
returns its pages to the OS whatever state malloc's heap is in: memory from torch's allocator can land in a
hole of the heap that free() never trims (a 128 MB pool stayed resident after another test's models).
Elsewhere (other OS, CUDA, small tensors) this is a plain torch.zeros.
"""
import mmap
import sys

import torch

HUGE_PAGE = 2 << 20


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.zeros(shape), on huge pages where possible: the pages are advised before they are first touched."""
    device = torch.device(device)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or not sys.platform.startswith("linux") or nbytes < HUGE_PAGE:
        return torch.zeros(shape, dtype=dtype, device=device)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE)  # unmapped when the last view of it is freed
    buffer = torch.frombuffer(region, dtype=torch.uint8)
    start = -buffer.data_ptr() % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    return buffer[start:start + nbytes].view(dtype).view(shape).zero_()  # touched now, not in the first steps
