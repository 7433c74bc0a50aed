"""A step's small index tensors built on the host in one buffer and sent to the device in one copy.

Each torch.tensor(list, device="cuda") is a pageable copy that blocks the host; one pinned buffer per step
and one non-blocking copy replace several of them. On the CPU the tensors are views of one host tensor.
"""
from collections.abc import Sequence
from itertools import chain

import torch


def to_device(device: torch.device, dtype: torch.dtype, *lists: Sequence[float]) -> list[torch.Tensor]:
    """One 1-D tensor per list (of numbers), on `device`, from a single host buffer."""
    host = torch.tensor(list(chain.from_iterable(lists)), dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    return list(host.split([len(x) for x in lists]))
