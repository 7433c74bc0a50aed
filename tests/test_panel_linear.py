"""ettrl_kernels._C.panel_linear (linear layers on weights packed into 48-column panels, AVX-512 BF16 CPUs)
against float64 matmuls and F.linear; the packed layout against a Python packing; bit-exact independence of rows
and threads."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from engine.extension import extension
from engine.layers import packed_linear

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_panels = pytest.mark.skipif(extension() is None or not extension().panel_linear_available(),
                                  reason="CPU lacks AVX512-BF16 (or C++ extension not built): no panel_linear")


def panel(x, w, bias=None, threads=2):
    """y = x w^T + bias from the C++ op on freshly packed panels."""
    packed = packed_linear.pack_panels(w)
    y = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype)
    assert extension().panel_linear(x.data_ptr(), packed.data.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                    y.data_ptr(), x.shape[0], x.shape[1], w.shape[0], x.dtype == torch.bfloat16,
                                    threads)
    return y


def python_panels(w: torch.Tensor) -> torch.Tensor:
    """The layout of csrc/panel_linear.h written out: panel, step (a pair of k for bf16, one k for fp32), column,
    element of the step; zero padding to whole panels and (bf16) an even number of k."""
    per_step = 2 if w.dtype == torch.bfloat16 else 1
    out, k = w.shape
    panels, k_pad = -(-out // 48), -(-k // per_step) * per_step
    padded = torch.zeros(panels * 48, k_pad, dtype=w.dtype)
    padded[:out, :k] = w
    return padded.view(panels, 48, k_pad // per_step, per_step).permute(0, 2, 1, 3).reshape(-1)


@pytest.mark.skipif(extension() is None, reason="C++ extension not built (ettrl_kernels._C)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (47, 5), (48, 64), (100, 33), (960, 576)])
def test_packed_layout(dtype, out_features, in_features):
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(out_features)).to(dtype)
    packed = packed_linear.pack_panels(w)
    assert torch.equal(packed.data, python_panels(w))
    assert (packed.out_features, packed.in_features) == (out_features, in_features)


@needs_panels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 64, 257])
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (70, 33), (1535, 17), (8, 1), (5, 97)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64(dtype, rows, in_features, out_features, with_bias):
    g = torch.Generator().manual_seed(rows * 1000 + in_features + out_features)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    w = (torch.randn(out_features, in_features, generator=g) / in_features ** 0.5).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype) if with_bias else None
    y = panel(x, w, bias)
    expected = x.double() @ w.double().T + (0 if bias is None else bias.double())
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[dtype])
    torch.testing.assert_close(y.double(), F.linear(x, w, bias).double(), **TOLERANCE[dtype])


@needs_panels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_and_threads_do_not_change_bits(dtype):
    """A row's output is the same bits alone, among 299 others (tiles of 8, chunks of 256) or on one thread."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 200, generator=g).to(dtype)
    w = torch.randn(300, 200, generator=g).to(dtype)
    together = panel(x, w)
    for rows in (1, 2, 5, 8, 9, 64, 256, 257):
        assert torch.equal(panel(x[:rows].contiguous(), w), together[:rows])
        assert torch.equal(panel(x[-rows:].contiguous(), w), together[-rows:])
    assert torch.equal(panel(x, w, threads=1), together)


@needs_panels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_uses_panels(dtype):
    w, b = torch.randn(100, 96).to(dtype), torch.randn(100).to(dtype)
    packed = packed_linear.pack(w, b)
    assert isinstance(packed, packed_linear.Panels)
    x = torch.randn(2, 5, 96).to(dtype)  # leading dimensions are kept
    y = packed_linear.linear(x, w, b, packed)
    assert y.shape == (2, 5, 100)
    assert torch.equal(y.reshape(10, 100), panel(x.reshape(10, 96), w, b))
    assert packed_linear.linear(x[:0], w, b, packed).shape == (0, 5, 100)


def test_off_switch_falls_back_to_onednn():
    """ETTRL_NO_PANEL_LINEAR=1: no panels; pack gives oneDNN's layout (or None without it) and linear still agrees."""
    code = ("import torch, torch.nn.functional as F; from engine.layers import packed_linear as p; "
            "from engine.extension import extension as e; "
            "assert e() is None or not e().panel_linear_available(); "
            "w = torch.randn(64, 96); packed = p.pack(w); "
            "assert not isinstance(packed, p.Panels); x = torch.randn(3, 96); "
            "torch.testing.assert_close(p.linear(x, w, None, packed), F.linear(x, w), atol=1e-5, rtol=1e-5)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "ETTRL_NO_PANEL_LINEAR": "1"},
                   check=True, timeout=120)


@needs_panels
def test_non_contiguous_weight_and_bias():
    """Views (a slice of a fused weight, a strided bias) are packed and read through contiguous copies."""
    g = torch.Generator().manual_seed(1)
    fused, bias_pairs = torch.randn(100, 200, generator=g), torch.randn(100, 2, generator=g)
    w, b = fused[:, 50:146], bias_pairs[:, 1]
    assert not w.is_contiguous() and not b.is_contiguous()
    packed = packed_linear.pack(w, b)
    x = torch.randn(7, 96, generator=g)
    torch.testing.assert_close(packed_linear.linear(x, w, b, packed), F.linear(x, w, b), atol=1e-5, rtol=1e-5)


@needs_panels
def test_a_weight_the_kernel_declines_is_not_packed():
    """panel_linear declines an empty inner dimension; pack then keeps the plain weight (F.linear) instead of
    trusting an output the kernel never wrote."""
    w = torch.randn(8, 0)
    assert packed_linear.pack(w) is None
    x = torch.randn(3, 0)
    assert torch.equal(packed_linear.linear(x, w, None, None), torch.zeros(3, 8))


@needs_panels
@pytest.mark.parametrize("rows", [1, 5, 8, 64, 257])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_out_is_the_bf16_output_widened(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 70, generator=g).bfloat16()
    w, bias = torch.randn(99, 70, generator=g).bfloat16(), torch.randn(99, generator=g).bfloat16()
    packed = packed_linear.pack_panels(w)
    bias = bias if with_bias else None
    got = packed_linear.linear_fp32_out(x, w, bias, packed)
    assert got.dtype == torch.float32
    assert torch.equal(got, packed_linear.linear(x, w, bias, packed).float())
    assert torch.equal(packed_linear.linear_fp32_out(x.float(), w.float(), None, None), F.linear(x.float(), w.float()))
