"""The fused layer stack (engine/layers/decode_layers.py) gives the Python layer loop's bits, in decode, prefill
and mixed steps."""
import logging
from typing import Any

import pytest
import torch

from engine import LLM, SamplingParams
from engine.extension import extension
from engine.layers import decode_layers
from engine.layers.decode_layers import FusedDecodeStats
from engine.models.llama import CausalLM
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
    stats = plain.engine.runner.model.fused_decode_stats  # not applicable: the loop ran
    assert stats.fused_steps == 0 and stats.loop_steps[decode_layers.NOT_PANELS] > 0


def run_steps(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> tuple[FusedDecodeStats, int]:
    """Generates PARAMS' tokens for PROMPTS: (the model's counter of this run alone, the number of steps it ran)."""
    runner, steps = llm.engine.runner, []
    run = runner.run
    monkeypatch.setattr(runner, "run", lambda seqs: steps.append(1) or run(seqs))
    runner.model.fused_decode_stats = FusedDecodeStats()
    llm.generate(PROMPTS, PARAMS)
    return runner.model.fused_decode_stats, len(steps)


@pytest.mark.skipif(extension() is None, reason="C++ extension not built")
@pytest.mark.parametrize("config, reason", [
    ({"fused_decode": False}, decode_layers.OFF),
    ({"fused_ops": False}, "rope and the cache write are not fused into the attention (EngineConfig.fused_ops=False)"),
    ({"attention_backend": "torch"}, "the torch attention backend runs no C++ kernel (the reference; cpu_paged does)"),
    ({"pack_weights": False}, decode_layers.NOT_PANELS),
])
def test_the_reason_the_fused_stack_is_off_is_counted_and_logged_once(config, reason, tmp_path, caplog, monkeypatch):
    make_tiny_model("qwen3", tmp_path)
    llm = LLM(tmp_path, dtype="float32", block_size=4, **config)
    with caplog.at_level(logging.INFO, logger="engine.layers.decode_layers"):
        stats, steps = run_steps(llm, monkeypatch)
    assert steps >= PARAMS.max_tokens and stats.fused_steps == 0 and stats.loop_steps == {reason: steps}
    assert stats.last_reason == reason
    assert [r.getMessage() for r in caplog.records] == [f"fused decode stack off: {reason}; steps take the Python "
                                                        "layer loop"]


@needs_panels
def test_fused_steps_are_counted(tmp_path, monkeypatch):
    make_tiny_model("llama", tmp_path)
    stats, steps = run_steps(LLM(tmp_path, dtype="bfloat16", block_size=4), monkeypatch)
    assert steps >= PARAMS.max_tokens and stats == FusedDecodeStats(fused_steps=steps)


class ExtraWeight(CausalLM):
    """Declares the C++ stack's layout but gives its layers a weight the stack does not read."""
    fused_decode_layout = decode_layers.LAYOUT

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        for layer in self.layers:
            layer.mlp.extra_scale = torch.nn.Parameter(torch.ones(4), requires_grad=False)


class RenamedNorm(CausalLM):
    """Declares the C++ stack's layout but keeps its input norm under another name."""
    fused_decode_layout = decode_layers.LAYOUT

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        for layer in self.layers:
            layer.pre_norm = layer.input_layernorm
            del layer.input_layernorm


@pytest.mark.skipif(extension() is None, reason="C++ extension not built")
@pytest.mark.parametrize("model_class, error", [
    (ExtraWeight, r"ExtraWeight.layers\[0\] has \['mlp.extra_scale'\], which the C\+\+ stack does not read"),
    (RenamedNorm, r"RenamedNorm.layers\[0\] has no input_layernorm.weight \(renamed\?\)"),
])
def test_a_layer_weight_the_stack_does_not_know_fails_by_name(model_class, error, tmp_path):
    make_tiny_model("llama", tmp_path)
    llm = LLM(tmp_path, dtype="float32")
    changed = model_class(llm.engine.runner.args, torch.float32, torch.device("cpu"), 64)
    changed.set_attention(llm.engine.runner.attn)
    with pytest.raises(RuntimeError, match=error):
        decode_layers.build(changed)


@pytest.mark.skipif(extension() is None, reason="C++ extension not built")
def test_the_cpp_structs_have_the_fields_python_fills_by_name():
    matmuls = [*decode_layers.MATMULS, *(f"{m}_bias" for m in decode_layers.MATMULS)]
    assert set(extension().DecodeLayerWeights.fields) == {*decode_layers.NORMS, *matmuls, *decode_layers.CACHES}
    with pytest.raises(AttributeError, match="input_layernrom"):
        extension().DecodeLayerWeights().input_layernrom = 1
    args = extension().DecodeStepArgs()
    for name, value in {"tokens": 1, "batch": 1, "num_decode": 1, "num_heads": 1, "num_kv_heads": 1}.items():
        setattr(args, name, value)
    with pytest.raises(ValueError, match="layer 0 has no input_norm"):  # a null tensor the stack needs, by name
        extension().decode_layers(extension().DecodeLayerTable([extension().DecodeLayerWeights()]), args)
