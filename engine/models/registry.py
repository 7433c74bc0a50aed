"""Which model class serves a Hugging Face checkpoint: config.json's `architectures` (else its model_type) -> a
ModelSpec (the class and the parser of its config).

The model interface is `Model` below, what the model runner, loader and engine use (llama.CausalLM is the
reference); `ModelArgsLike` is what they read of the parsed config. A class that also declares
`fused_decode_layout` may take decode steps through the C++ layer stack (engine/layers/decode_layers.py).
Adding a Llama-like architecture: a parser (or a module with its own model class) and one line in MODELS.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import torch

from engine.models.llama import CausalLM, ModelArgs

if TYPE_CHECKING:  # annotations only
    from typing_extensions import Self

    from engine.attention.base import AttentionBackend


class ModelArgsLike(Protocol):
    """A model's config.json as parsed by its spec's `parse_args` (llama.ModelArgs is one)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: str | None  # the checkpoint's dtype name, if it gives one


class Model(Protocol):
    """The model interface: a torch module built from its args with uninitialised weights, which the loader fills
    through hf_parameter_views()."""
    fused_decode: bool  # whether decode steps may take the C++ layer stack (only where fused_decode_layout is set)

    def __init__(self, args: ModelArgsLike, dtype: torch.dtype, device: torch.device, max_positions: int) -> None:
        """Allocates the weights (uninitialised)."""

    @property
    def args(self) -> ModelArgsLike:
        """The parsed args it was built from."""

    @property
    def lm_head(self) -> torch.Tensor:
        """The output projection [vocab, hidden] (the CPU matmul choice measures its shape)."""

    def hf_parameter_views(self) -> dict[str, torch.Tensor]:
        """Hugging Face name -> where that checkpoint tensor lives (the loader and update_weights copy into these
        views in place)."""

    def set_attention(self, attn: AttentionBackend | None) -> None:
        """The engine's paged-attention backend (engine/attention); None while asleep."""

    def pack_weights(self, enabled: bool = True, kernel: str | None = None) -> None:
        """(Re)builds packed matmul weights; called after weights change."""

    def use_fused_ops(self, enabled: bool = True) -> bool:
        """C++ layer ops where they apply; returns whether they do."""

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, logits_indices: torch.Tensor) -> torch.Tensor:
        """input_ids [T], positions [T], logits_indices [B] -> fp32 logits [B, vocab]."""

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        """Its weights (torch.nn.Module's)."""

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of every weight (torch.nn.Module's)."""

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        """Its buffers (torch.nn.Module's)."""

    def eval(self) -> Self:
        """Inference mode (torch.nn.Module's)."""


@dataclass(frozen=True)
class ModelSpec:
    model_class: type[Model]
    parse_args: Callable[[dict[str, Any]], ModelArgsLike]  # config.json as a dict -> the args model_class takes


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


def model_spec(hf_config: dict[str, Any]) -> ModelSpec:
    """The spec of the first of the config's architectures that is registered; a clear error if none is."""
    names = hf_config.get("architectures") or [MODEL_TYPES.get(hf_config.get("model_type", ""))]
    for name in names:
        if name in MODELS:
            return MODELS[name]
    given = hf_config.get("architectures") or f"model_type {hf_config.get('model_type')!r}"
    raise ValueError(f"unsupported model architecture {given}; supported: {sorted(MODELS)} (model types "
                     f"{sorted(MODEL_TYPES)}). A Llama-like one is a line in engine/models/registry.py")
