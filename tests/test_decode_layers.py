"""The fused layer stack (engine/layers/decode_layers.py) gives the Python layer loop's bits, in decode, prefill
and mixed steps."""
import pytest

from engine import LLM, SamplingParams
from engine.extension import extension
from engine.layers import decode_layers
from tiny_models import make_tiny_model

needs_panels = pytest.mark.skipif(extension() is None or not extension().panel_linear_available(),
                                  reason="CPU lacks AVX512-BF16 (or C++ extension not built): no panel_linear")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 100, 200], list(range(20, 57))]
PARAMS = SamplingParams(n=3, temperature=0.9, max_tokens=24, seed=3, ignore_eos=True)


def outputs(llm: LLM, fused: bool):
    llm.engine.runner.model.fused_decode = fused
    return [(c.token_ids, c.logprobs, c.entropies) for out in llm.generate(PROMPTS, PARAMS) for c in out.outputs]


@needs_panels
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2", "qwen3"])
def test_fused_decode_equals_the_layer_loop_bit_for_bit(kind, dtype, tmp_path, monkeypatch):
    make_tiny_model(kind, tmp_path)
    llm = LLM(tmp_path, dtype=dtype, block_size=4)
    loop = outputs(llm, fused=False)
    calls = []
    op = decode_layers._OP
    monkeypatch.setattr(decode_layers, "_OP", lambda *args: calls.append(1) or op(*args))
    fused = outputs(llm, fused=True)
    assert len(calls) == PARAMS.max_tokens  # every step ran fused, the prompts' prefill included
    assert fused == loop  # tokens, and logprobs and entropies as exact floats


@needs_panels
def test_fused_decode_follows_weight_updates(tmp_path):
    make_tiny_model("qwen2", tmp_path / "a", seed=0)
    make_tiny_model("qwen2", tmp_path / "b", seed=1)
    llm, fresh = LLM(tmp_path / "a", dtype="float32"), LLM(tmp_path / "b", dtype="float32")
    outputs(llm, fused=True)
    llm.update_weights(fresh.engine.runner.model.hf_parameter_views())
    assert outputs(llm, fused=True) == outputs(fresh, fused=True)


def test_unpacked_weights_take_the_layer_loop(tmp_path):
    make_tiny_model("llama", tmp_path)
    # F.linear's rows depend on the batch, so both runs need the same steps: no prefix cache hits in the second
    plain = LLM(tmp_path, dtype="float32", pack_weights=False, enable_prefix_caching=False)
    assert outputs(plain, fused=True) == outputs(plain, fused=False)
    assert plain.engine.runner.model._decode_table is False  # not applicable: the loop ran
