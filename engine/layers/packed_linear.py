"""Linear layers on the CPU with weights reordered once into a blocked layout: panels for our own kernel, or oneDNN's.

`F.linear` hands oneDNN/MKL a plain [out, in] weight and pays for re-blocking it inside every call. For the
decode shapes of a small model (a few to a few hundred rows) that is most of the cost, so a pre-packed
weight is much faster in both fp32 and bf16 (docs/benchmarks.md). The plain weights stay the source of truth
(the loader and update_weights write them); `pack` is called again after every write.

This uses the op torch's own CPU compiler (inductor) emits for frozen linears; where it is missing or gives a
different answer, `pack` returns None and `linear` falls back to F.linear.

On CPUs with AVX-512 BF16 (Zen 4, Sapphire Rapids and later) the weights are packed into 48-column panels for
`ettrl_kernels._C.panel_linear` (csrc/panel_linear.cpp) instead: 8 rows x 48 columns a tile at the vdpbf16ps (or FMA)
rate, faster than oneDNN on the shapes of SmolLM2 from 1 to 1024 rows (docs/benchmarks.md). Its sums do not
depend on the number of rows, so a sequence's logits do not depend on the batch it runs in.
"""
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from engine.extension import extension, extension_op
from engine.memory import zeros

PACKED_DTYPES = (torch.float32, torch.bfloat16)
BATCH_HINT = 64  # oneDNN picks its blocking for this many rows; any row count works
_PANEL = extension_op("panel_linear")


@dataclass(frozen=True)
class Panels:
    """A weight packed by ettrl_kernels._C.pack_panels for panel_linear."""
    data: torch.Tensor
    out_features: int
    in_features: int


def panels_supported(weight: torch.Tensor) -> bool:
    return (_PANEL is not None and weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES
            and weight.dim() == 2 and _extension().panel_linear_available())


def _extension() -> ModuleType:
    """ettrl_kernels._C (panels are made and used only where it is built)."""
    ext = extension()
    if ext is None:
        raise RuntimeError("ettrl_kernels._C is not built: python setup.py build_ext --inplace")
    return ext


def pack_panels(weight: torch.Tensor) -> Panels:
    out_features, in_features = weight.shape
    bf16 = weight.dtype == torch.bfloat16
    weight = weight.contiguous()  # held by a name: the extension reads its raw pointer
    data = zeros((_extension().panel_packed_elements(out_features, in_features, bf16),), weight.dtype, "cpu")
    _extension().pack_panels(weight.data_ptr(), data.data_ptr(), out_features, in_features, bf16)
    return Panels(data, out_features, in_features)


def packing_supported(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES and weight.dim() == 2
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _pack_onednn(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), BATCH_HINT)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@torch.inference_mode()
def pack(weight: torch.Tensor, bias: torch.Tensor | None = None,
         kernel: str | None = None) -> Panels | torch.Tensor | None:
    """The weight for `kernel` ("panel", "onednn" or "torch": matmul_choice.py): in panels, in oneDNN's layout, or
    None (F.linear); also None where that packing is unsupported or its product disagrees with F.linear.
    kernel None: panels on AVX-512 BF16 CPUs, else oneDNN's."""
    if kernel is None:
        kernel = "panel" if panels_supported(weight) else "onednn"
    make: Callable[[torch.Tensor], Any]
    product: Callable[..., torch.Tensor]  # (x, what make returned, bias)
    if kernel == "panel" and panels_supported(weight):
        make, product = pack_panels, _panel_linear
    elif kernel == "onednn" and packing_supported(weight):
        make, product = _pack_onednn, _packed_linear
    else:
        return None
    try:
        packed: Any = make(weight)  # the argument `product` takes
        probe = torch.randn(3, weight.shape[1], dtype=weight.dtype, generator=torch.Generator().manual_seed(0))
        expected = F.linear(probe, weight, bias).float()
        got = product(probe, packed, bias).float()
    except RuntimeError:
        return None
    tolerance = 1e-3 if weight.dtype == torch.float32 else 5e-2
    scale = expected.abs().max().item() + 1.0
    return packed if (got - expected).abs().max().item() <= tolerance * scale else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: Panels | torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias, through the packed weight when there is one."""
    if packed is None:
        return F.linear(x, weight, bias)
    if isinstance(packed, Panels):
        return _panel_linear(x, packed, bias)
    return _packed_linear(x, packed, bias)


def linear_fp32_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    packed: Panels | torch.Tensor | None) -> torch.Tensor:
    """linear(...).float(); bf16 panels write the rounded results as fp32 directly (no bf16 tensor, no second pass)."""
    if isinstance(packed, Panels) and x.dtype == torch.bfloat16:
        return _panel_linear(x, packed, bias, fp32_out=True)
    return linear(x, weight, bias, packed).float()


def _panel_linear(x: torch.Tensor, packed: Panels, bias: torch.Tensor | None, fp32_out: bool = False) -> torch.Tensor:
    if x.dtype != packed.data.dtype or (bias is not None and bias.dtype != x.dtype):
        raise RuntimeError(f"panel_linear takes one dtype, got x {x.dtype}, weight {packed.data.dtype}"
                           f"{'' if bias is None else f', bias {bias.dtype}'}")
    rows = x.reshape(-1, packed.in_features).contiguous()
    bias = None if bias is None else bias.contiguous()  # held by names: the extension reads raw pointers
    y = rows.new_empty(rows.shape[0], packed.out_features, dtype=torch.float32 if fp32_out else x.dtype)
    panel = _PANEL if _PANEL is not None else _extension().panel_linear
    if rows.shape[0] and not panel(rows.data_ptr(), packed.data.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                    y.data_ptr(), rows.shape[0], packed.in_features, packed.out_features,
                                    x.dtype == torch.bfloat16, torch.get_num_threads(), fp32_out):
        raise RuntimeError(f"panel_linear declined {tuple(rows.shape)} x {packed.in_features} -> "
                           f"{packed.out_features} (no AVX-512 BF16, or an empty dimension)")
    return y.view(*x.shape[:-1], packed.out_features)
