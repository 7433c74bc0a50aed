"""The trainable policy: a transformers causal LM loaded from the same directory the engine serves.

`response_stats` runs one padded micro-batch of prompt + response sequences and returns, for every
response token, its log-probability (differentiable) and the entropy of the sampling distribution
(detached), both at the rollout temperature; logits exist only for response positions.
`shared_prompt_stats` returns the same for responses that follow one prompt, running the prompt once: its
keys and values (with their graph) serve every response, so a step's n_train responses of a prompt cost one
prompt forward and backward instead of n_train.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PaddedBatch(TypedDict):
    """pad_batch's micro-batch: prompt + response rows, right-padded, and where each response token is predicted."""
    input_ids: torch.Tensor       # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    rows: torch.Tensor            # the (row, column) of each response token's predictor, in row order
    cols: torch.Tensor
    targets: torch.Tensor         # the response tokens, concatenated
    lengths: list[int]            # response lengths


def load_policy(model_dir: str | Path, dtype: str = "float32", device: str = "cpu",
                gradient_checkpointing: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) in train mode; dropout off so that a step is a deterministic function of the batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[dtype]).to(device)
    model.config.use_cache = False
    if gradient_checkpointing:  # activation_checkpointing_enable: transformers >= 5 (the old name warns there)
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return model, tokenizer


def pad_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
              device: torch.device | str) -> PaddedBatch:
    """Right-padded input ids, attention mask, and the (row, position) of each response token's predictor."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        s = p + r
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        rows += [i] * len(r)
        cols += range(len(p) - 1, len(s) - 1)
        targets += r
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "rows": torch.tensor(rows, device=device), "cols": torch.tensor(cols, device=device),
            "targets": torch.tensor(targets, device=device), "lengths": [len(r) for r in responses]}


def response_stats(model: PreTrainedModel, batch: PaddedBatch, temperature: float = 1.0,
                   **decoder_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, entropies) of all response tokens of the batch, concatenated in row order; decoder_kwargs go to
    the decoder (shared_prompt_stats passes its cache and positions)."""
    from ettrl_kernels import token_stats

    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 **decoder_kwargs).last_hidden_state
    logits = model.get_output_embeddings()(hidden[batch["rows"], batch["cols"]])
    return token_stats(logits, batch["targets"], temperature=temperature)


def shared_prompt_stats(model: PreTrainedModel, prompt: list[int], responses: list[list[int]], pad_id: int,
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """response_stats of prompt + each response, with the prompt's forward run once for all of them.

    The prompt minus its last token runs as a batch of one and leaves its keys and values in a cache (the
    gradient flows back through them from every response); then the responses run as a padded batch whose
    prompt is that last token, attending to the cache."""
    from transformers import DynamicCache

    device = _device(model)
    if len(prompt) < 2 or not any(responses):  # nothing to share
        return response_stats(model, pad_batch([prompt] * len(responses), responses, pad_id, device), temperature)
    decoder, cache, shared = model.get_decoder(), DynamicCache(), len(prompt) - 1
    kw = _cache_keyword(decoder)
    decoder(input_ids=torch.tensor([prompt[:-1]], device=device), use_cache=True, **{kw: cache})
    cache.batch_repeat_interleave(len(responses))
    batch = pad_batch([prompt[-1:]] * len(responses), responses, pad_id, device)
    # The last column holds only the longest responses' last tokens, which predict nothing: drop it.
    ids, mask = batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1]
    batch["input_ids"], batch["attention_mask"] = ids, torch.cat([mask.new_ones(len(responses), shared), mask], 1)
    positions = torch.arange(shared, shared + ids.shape[1], device=device).expand(len(responses), -1)
    return response_stats(model, batch, temperature, position_ids=positions, use_cache=True, **{kw: cache})


def _cache_keyword(decoder: nn.Module) -> str:
    """transformers 5.x calls the cache argument `cache` (`past_key_values` is deprecated); 4.x `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
