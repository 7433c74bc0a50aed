"""oneDNN-packed linears (engine/layers/packed_linear.py) against F.linear, and the engine with and without them."""
import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.layers.packed_linear import linear, pack, packing_supported
from tiny_models import make_tiny_model

# panels round like oneDNN, not bit for bit
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 64, 300])
def test_packed_linear_equals_f_linear(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(200, 96, generator=g).to(dtype)
    b = torch.randn(200, generator=g).to(dtype)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    packed = pack(w, b)
    if not packing_supported(w):
        pytest.skip("torch build lacks oneDNN linear")
    assert packed is not None
    torch.testing.assert_close(linear(x, w, b, packed).float(), F.linear(x, w, b).float(), **TOLERANCE[dtype])


def test_no_packing_off_cpu_dtypes():
    assert pack(torch.randn(8, 4, dtype=torch.float64)) is None
    x, w = torch.randn(2, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(linear(x, w, None, None), F.linear(x, w))


def test_engine_tokens_do_not_depend_on_packing(tmp_path):
    make_tiny_model("qwen2", tmp_path)
    prompts = [[5, 6, 7, 8], list(range(30, 70))]
    params = SamplingParams(n=2, temperature=0.8, max_tokens=32, seed=1, ignore_eos=True)
    runs = [LLM(tmp_path, dtype="float32", pack_weights=on).generate(prompts, params) for on in (True, False)]
    for packed, plain in zip(*runs):
        for a, b in zip(packed.outputs, plain.outputs):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
