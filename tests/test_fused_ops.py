"""The C++ fused layer ops (engine/layers/fused_ops.py) against the torch code they replace."""
import pytest
import torch
import torch.nn.functional as F

from engine.layers import fused_ops
from engine.layers.rope import RotaryEmbedding, apply_rope
from engine.models.llama import RMSNorm

pytestmark = pytest.mark.skipif(not fused_ops.fused_supported("cpu", torch.float32), reason="C++ extension not built")
DTYPES = [torch.float32, torch.bfloat16]
FP32 = dict(atol=1e-5, rtol=1e-5)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 units in the last place (both bf16, same sign or zero)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def make_norm(dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(dim, 1e-5, dtype, "cpu")
    norm.weight.data = (1 + 0.3 * torch.randn(dim, generator=g)).to(dtype)
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 300])  # 300 x 576 takes the multi-threaded path
def test_rms_norm_with_residual(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x, residual = (torch.randn(rows, 576, generator=g) * 3).to(dtype), torch.randn(rows, 576, generator=g).to(dtype)
    norm = make_norm(576, dtype)
    expected_residual = residual + x
    expected = norm(expected_residual)
    out, res = fused_ops.rms_norm(x, norm.weight, norm.eps, residual)
    assert res is residual and torch.equal(residual, expected_residual)  # the add is exact and in place
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, **FP32)
    else:  # rounded where the module rounds; the sum of squares may differ in its last fp32 bit
        assert ulps_apart(out, expected).max() <= 1 and (out != expected).float().mean() < 1e-3
    torch.testing.assert_close(fused_ops.rms_norm(x, norm.weight, norm.eps).float(), norm(x).float(),
                               atol=0, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    gate_up = (torch.randn(300, 2 * 96, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    expected = F.silu(gate_up[:, :96]) * gate_up[:, 96:]
    out = fused_ops.silu_and_mul(gate_up)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, **FP32)
    else:
        assert torch.equal(out, expected)


def check_equal(a, b, exact: bool):
    """bf16: bit-identical (rounded where torch rounds); fp32 may use a fused multiply-add where torch rounds twice."""
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, **FP32)


def rope_case(dtype, heads, kv_heads, dim, tokens=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    rope = RotaryEmbedding(dim, 512, 10000.0, None, "cpu")
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    positions = torch.randint(0, 512, (tokens,), generator=g)
    slots = torch.randperm(100, generator=g)[:tokens]
    return rope, qkv, positions, slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (9, 3, 64), (2, 2, 128)])
def test_rope_and_cache(dtype, heads, kv_heads, dim):
    rope, qkv, positions, slots = rope_case(dtype, heads, kv_heads, dim)
    k_cache = torch.zeros(100, kv_heads * dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    q = fused_ops.rope_and_cache(qkv, k_cache, v_cache, slots, positions, rope.cos, rope.sin, heads, kv_heads, dim)
    cos, sin = rope.lookup(positions, dtype)
    t = qkv.shape[0]
    expected = apply_rope(qkv[:, :(heads + kv_heads) * dim].view(t, -1, dim), cos, sin)
    check_equal(q, expected[:, :heads], exact=dtype == torch.bfloat16)
    check_equal(k_cache[slots].view(t, kv_heads, dim), expected[:, heads:], exact=dtype == torch.bfloat16)
    assert torch.equal(v_cache[slots], qkv[:, (heads + kv_heads) * dim:])
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_cache_with_qk_norm(dtype):
    heads, kv_heads, dim = 4, 2, 32
    rope, qkv, positions, slots = rope_case(dtype, heads, kv_heads, dim, seed=3)
    q_norm, k_norm = make_norm(dim, dtype, 1), make_norm(dim, dtype, 2)
    k_cache = torch.zeros(100, kv_heads * dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    q = fused_ops.rope_and_cache(qkv, k_cache, v_cache, slots, positions, rope.cos, rope.sin, heads, kv_heads, dim,
                                 q_norm.weight, k_norm.weight, q_norm.eps)
    t = qkv.shape[0]
    cos, sin = rope.lookup(positions, dtype)
    q_ref = apply_rope(q_norm(qkv[:, :heads * dim].view(t, heads, dim)), cos, sin)
    k_ref = apply_rope(k_norm(qkv[:, heads * dim:(heads + kv_heads) * dim].view(t, kv_heads, dim)), cos, sin)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else FP32
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(k_cache[slots].view(t, kv_heads, dim), k_ref, **tol)


def test_bad_inputs_raise_clear_errors():
    rope, qkv, positions, slots = rope_case(torch.float32, 4, 2, 16)
    cache = torch.zeros(100, 2 * 16)
    with pytest.raises(ValueError, match="qkv has"):
        fused_ops.rope_and_cache(qkv, cache, cache.clone(), slots, positions, rope.cos, rope.sin, 4, 1, 16)
    with pytest.raises(ValueError, match="positions"):
        fused_ops.rope_and_cache(qkv, cache, cache.clone(), slots, positions.int(), rope.cos, rope.sin, 4, 2, 16)
    with pytest.raises(ValueError, match="residual"):
        fused_ops.rms_norm(torch.randn(3, 8), torch.ones(8), 1e-6, torch.randn(3, 8).to(torch.bfloat16))
    with pytest.raises(ValueError, match="weight has"):
        fused_ops.rms_norm(torch.randn(3, 8), torch.ones(9), 1e-6)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_fused_engine_equals_torch_path(tmp_path, kind):
    from engine import LLM, SamplingParams
    from tiny_models import make_tiny_model

    make_tiny_model(kind, tmp_path)
    prompts = [[5, 6, 7, 8], list(range(30, 70)), [9] * 21]
    params = SamplingParams(n=2, temperature=0.8, max_tokens=40, seed=2, ignore_eos=True)
    outs = []
    for fused in (True, False):
        llm = LLM(tmp_path, dtype="float32", block_size=4, fused_ops=fused)
        assert llm.engine.runner.attn.takes_qkv == fused
        outs.append(llm.generate(prompts, params))
    for a, b in zip(*outs):
        for x, y in zip(a.outputs, b.outputs):
            assert x.token_ids == y.token_ids
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.tensor(x.entropies), torch.tensor(y.entropies), atol=1e-4, rtol=0)
