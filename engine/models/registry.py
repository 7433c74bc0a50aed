"""Which model class serves a Hugging Face checkpoint: config.json's `architectures` (else its model_type) -> a
ModelSpec (the class and the parser of its config).

The model interface, what the model runner, loader and engine use (llama.CausalLM is the reference):
    Model.from_hf(config: dict) is the spec's `parse_args`: -> args with vocab_size, num_layers, num_heads,
        num_kv_heads, head_dim, max_position_embeddings, tie_word_embeddings, torch_dtype (a str or None)
    Model(args, dtype, device, max_positions)          allocates the weights (uninitialised)
    .args                                             the parsed args
    .hf_parameter_views() -> {HF name: tensor}        where each checkpoint tensor lives (the loader and
                                                      update_weights copy into these views in place)
    .set_attention(backend)                           the engine's paged-attention backend (engine/attention)
    .pack_weights(enabled, kernel=None)               (re)build packed matmul weights; called after weights change
    .use_fused_ops(enabled) -> bool                   C++ layer ops where they apply; returns whether they do
    .forward(input_ids [T], positions [T], logits_indices [B]) -> fp32 logits [B, vocab]
    .fused_decode: bool                               whether decode steps may take the C++ layer stack; only
                                                      classes that declare fused_decode_layout (decode_layers.py)
Adding a Llama-like architecture: a parser (or a module with its own model class) and one line in MODELS.
"""
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from engine.models.llama import CausalLM, ModelArgs


@dataclass(frozen=True)
class ModelSpec:
    model_class: type
    parse_args: Callable[[dict], object]  # config.json as a dict -> the args model_class takes


def _llama(kind: str) -> ModelSpec:
    return ModelSpec(CausalLM, partial(ModelArgs.from_hf, kind=kind))


MODELS = {  # Hugging Face `architectures` name -> spec
    "LlamaForCausalLM": _llama("llama"),
    "MistralForCausalLM": _llama("llama"),
    "Qwen2ForCausalLM": _llama("qwen2"),
    "Qwen3ForCausalLM": _llama("qwen3"),
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}  # for a config.json without `architectures`


def model_spec(hf_config: dict) -> ModelSpec:
    """The spec of the first of the config's architectures that is registered; a clear error if none is."""
    names = hf_config.get("architectures") or [MODEL_TYPES.get(hf_config.get("model_type"))]
    for name in names:
        if name in MODELS:
            return MODELS[name]
    given = hf_config.get("architectures") or f"model_type {hf_config.get('model_type')!r}"
    raise ValueError(f"unsupported model architecture {given}; supported: {sorted(MODELS)} (model types "
                     f"{sorted(MODEL_TYPES)}). A Llama-like one is a line in engine/models/registry.py")
