"""The trainable policy: a transformers causal LM loaded from the same directory the engine serves.

`response_stats` runs one padded micro-batch of prompt + response sequences and returns, for every
response token, its log-probability (differentiable) and the entropy of the sampling distribution
(detached), both at the rollout temperature; logits exist only for response positions.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_policy(model_dir: str | Path, dtype: str = "float32", device: str = "cpu", gradient_checkpointing: bool = False):
    """(model, tokenizer) in train mode; dropout off so that a step is a deterministic function of the batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[dtype]).to(device)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return model, tokenizer


def pad_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device) -> dict:
    """Right-padded input ids, attention mask, and the (row, position) of each response token's predictor."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, targets = [], [], []
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


def response_stats(model, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, entropies) of all response tokens of the batch, concatenated in row order."""
    from kernels import token_stats

    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model.get_output_embeddings()(hidden[batch["rows"], batch["cols"]])
    return token_stats(logits, batch["targets"], temperature=temperature)

