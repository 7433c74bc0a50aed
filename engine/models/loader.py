"""Read a Hugging Face checkpoint directory: config.json and (possibly sharded) safetensors weights."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

if TYPE_CHECKING:  # annotations only: the registry imports the models, which the runner loads through here
    from engine.models.registry import Model

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
NamedTensors = dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]  # a state dict or (HF name, tensor) pairs


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} has no config.json; expected a Hugging Face model directory")
    return json.loads(path.read_text())


def safetensors_files(model_dir: Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def check_named_tensors(views: dict[str, torch.Tensor], named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raises unless every (HF name, tensor) names a parameter of the model (KeyError), has its shape, a
    floating-point dtype and only finite values (ValueError): checked for all before any weight is written."""
    for name, tensor in named_tensors:
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name not in views:
            raise KeyError(f"unknown parameter name {name!r}; expected Hugging Face names such as "
                           f"'model.layers.0.self_attn.q_proj.weight'")
        if tuple(views[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match the model's "
                             f"{tuple(views[name].shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name}: dtype {tensor.dtype} is not a floating-point type; send the weights as "
                             f"float32, bfloat16 or float16")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} holds NaN or infinite values; nothing was written")


@torch.inference_mode()
def copy_named_tensors(views: dict[str, torch.Tensor], named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Copies each (HF name, tensor) into its view in place; returns the names written."""
    written: set[str] = set()
    for name, tensor in named_tensors:
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name not in views:
            raise KeyError(f"unknown parameter name {name!r}; expected Hugging Face names such as "
                           f"'model.layers.0.self_attn.q_proj.weight'")
        dst = views[name]
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match the model's {tuple(dst.shape)}")
        dst.copy_(tensor)
        written.add(name)
    return written


def load_weights(model: Model, model_dir: Path) -> None:
    views = model.hf_parameter_views()
    written = copy_named_tensors(views, iter_safetensors(model_dir))
    missing = set(views) - written
    if model.args.tie_word_embeddings:
        missing -= {"lm_head.weight", "model.embed_tokens.weight"} if written & {"lm_head.weight",
                                                                              "model.embed_tokens.weight"} else set()
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
