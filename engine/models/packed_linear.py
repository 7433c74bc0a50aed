"""Linear layers on the CPU with weights reordered once into oneDNN's blocked layout.

`F.linear` hands oneDNN/MKL a plain [out, in] weight and pays for re-blocking it inside every call. For the
decode shapes of a small model (a few to a few hundred rows) that is most of the cost: on the 2-core
development machine a pre-packed weight is 1.5-3x faster in both fp32 and bf16 (lm_head of SmolLM2 at 64 rows,
fp32: 37 ms -> 18 ms). The plain weights stay the source of truth (the loader and update_weights write them);
`pack` is called again after every write.

This uses the op torch's own CPU compiler (inductor) emits for frozen linears; where it is missing or gives a
different answer, `pack` returns None and `linear` falls back to F.linear.

With very few rows (decode of a handful of sequences) a linear layer only streams its weight once, and oneDNN does
that at well under the memory bandwidth; there `linear` calls `engine._C.skinny_linear` (csrc/skinny_linear.cpp,
CPUs with AVX-512 BF16) on the plain weight instead.
"""
import os

import torch
import torch.nn.functional as F

from engine.extension import extension_op

PACKED_DTYPES = (torch.float32, torch.bfloat16)
BATCH_HINT = 64  # oneDNN picks its blocking for this many rows; any row count works
SKINNY_MAX_ROWS = int(os.environ.get("ETTRL_SKINNY_ROWS", 2))  # up to this many rows: skinny_linear (0: never)
_SKINNY = extension_op("skinny_linear")


def packing_supported(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES and weight.dim() == 2
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@torch.inference_mode()
def pack(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """The weight in oneDNN's layout, or None where packing is unsupported or disagrees with F.linear."""
    if not packing_supported(weight):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), BATCH_HINT)
        probe = torch.randn(3, weight.shape[1], dtype=weight.dtype, generator=torch.Generator().manual_seed(0))
        expected = F.linear(probe, weight, bias).float()
        got = _packed_linear(probe, packed, bias).float()
    except RuntimeError:
        return None
    tolerance = 1e-3 if weight.dtype == torch.float32 else 5e-2
    scale = expected.abs().max().item() + 1.0
    return packed if (got - expected).abs().max().item() <= tolerance * scale else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias, through the packed weight when there is one."""
    if packed is None:
        return F.linear(x, weight, bias)
    if x.dim() == 2 and x.shape[0] <= SKINNY_MAX_ROWS and _SKINNY is not None:
        y = _skinny_linear(x, weight, bias)
        if y is not None:
            return y
    return _packed_linear(x, packed, bias)


def _skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """skinny_linear for contiguous CPU tensors of one dtype (the packed path's cases); None where it declines."""
    x = x.contiguous()
    if x.dtype != weight.dtype or not weight.is_contiguous() or (bias is not None and bias.dtype != x.dtype):
        return None
    y = x.new_empty(x.shape[0], weight.shape[0])
    done = _SKINNY(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.contiguous().data_ptr(), y.data_ptr(),
                   x.shape[0], x.shape[1], weight.shape[0], x.dtype == torch.bfloat16, torch.get_num_threads())
    return y if done else None
