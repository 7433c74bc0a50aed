"""engine._C.skinny_linear (few-row linear layers, AVX-512 BF16 CPUs) against float64 matmuls and F.linear."""
import pytest
import torch
import torch.nn.functional as F

from engine.models import packed_linear

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}


def skinny(x, w, bias=None):
    """(done, y): y = x w^T + bias from the C++ op, or done False where it declines."""
    from engine import _C

    y = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype)
    done = _C.skinny_linear(x.data_ptr(), w.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                            x.shape[0], x.shape[1], w.shape[0], x.dtype == torch.bfloat16, 2)
    return done, y


def available() -> bool:
    x, w = torch.ones(1, 32), torch.ones(16, 32)
    return packed_linear._SKINNY is not None and skinny(x, w)[0]


needs_skinny = pytest.mark.skipif(not available(), reason="no AVX-512 BF16 on this CPU (or no engine._C)")


@needs_skinny
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 11, 16])
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (70, 33), (1536, 17), (8, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64(dtype, rows, in_features, out_features, with_bias):
    g = torch.Generator().manual_seed(rows * 1000 + in_features + out_features)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    w = (torch.randn(out_features, in_features, generator=g) / in_features ** 0.5).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype) if with_bias else None
    done, y = skinny(x, w, bias)
    assert done
    expected = x.double() @ w.double().T + (0 if bias is None else bias.double())
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[dtype])
    torch.testing.assert_close(y.double(), F.linear(x, w, bias).double(), **TOLERANCE[dtype])


@needs_skinny
def test_rows_are_independent():
    """Each output row depends on its own input row only: the same row alone or among 15 others, bit for bit."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 200, generator=g).bfloat16()
    w = torch.randn(300, 200, generator=g).bfloat16()
    _, together = skinny(x, w)
    for rows in (1, 2, 5, 16):
        _, part = skinny(x[:rows].contiguous(), w)
        assert torch.equal(part, together[:rows])


@needs_skinny
@pytest.mark.parametrize("rows", [0, 17])
def test_declines_outside_its_rows(rows):
    done, y = skinny(torch.ones(rows, 32), torch.ones(16, 32))
    assert not done and (rows == 0 or torch.isnan(y).all())


@needs_skinny
def test_linear_routes_few_rows_through_it(monkeypatch):
    calls = []
    real = packed_linear._SKINNY
    monkeypatch.setattr(packed_linear, "_SKINNY", lambda *a: calls.append(a[4]) or real(*a))
    w = torch.randn(64, 96)
    packed = packed_linear.pack(w)
    assert packed is not None
    for rows in (1, packed_linear.SKINNY_MAX_ROWS, packed_linear.SKINNY_MAX_ROWS + 1, 64):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(packed_linear.linear(x, w, None, packed), F.linear(x, w), atol=1e-5, rtol=1e-5)
    assert calls == [1, packed_linear.SKINNY_MAX_ROWS]
