"""verl's rollout batch fields from engine responses (leaves of trees, or parallel samples), as its agent loop
lays them out: prompts left-padded to rollout.prompt_length, responses right-padded to rollout.response_length.

    prompts [B, P]  responses [B, R]  response_mask [B, R]  input_ids / attention_mask / position_ids [B, P + R]
    rollout_log_probs [B, R]  rollout_entropies [B, R] (ours: the sampler's full-vocabulary entropy per token)

A group with fewer responses than verl's rollout.n (a tree that could not fork all its branches) is filled as our
trainer fills it (ettrl.update.pad_samples): zero-weight copies of its last response, here a copy whose
response_mask is all zero, so no token of it counts in the loss, and which rewards and our estimators skip.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from verl.utils.model import compute_position_id_with_mask


@dataclass
class Leaf:
    """One response as the engine returns it (a tree leaf or a parallel sample)."""
    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    finish_reason: str
    padding: bool = False

    @classmethod
    def from_json(cls, d: dict) -> Leaf:
        return cls(list(d["token_ids"]), list(d["logprobs"]), list(d["entropies"]), d["finish_reason"])


def pad_group(leaves: list[Leaf], count: int) -> list[Leaf]:
    """`leaves` filled up to `count` with zero-weight copies of the last one (ettrl.update.pad_samples' rule)."""
    if not leaves:
        raise ValueError("a prompt group came back without any response to pad from")
    if len(leaves) > count:
        raise ValueError(f"{len(leaves)} responses for a group of {count} rows (rollout.n)")
    return leaves + [replace(leaves[-1], padding=True)] * (count - len(leaves))


def build_fields(prompts: list[list[int]], leaves: list[Leaf], prompt_length: int, response_length: int,
                 pad_id: int) -> dict[str, torch.Tensor]:
    """One row per (prompt ids, leaf)."""
    if len(prompts) != len(leaves):
        raise ValueError(f"{len(prompts)} prompts for {len(leaves)} responses")
    rows = len(leaves)
    prompt_ids = torch.full((rows, prompt_length), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((rows, prompt_length), dtype=torch.long)
    response_ids = torch.full((rows, response_length), pad_id, dtype=torch.long)
    response_attention = torch.zeros((rows, response_length), dtype=torch.long)
    logprobs = torch.zeros((rows, response_length), dtype=torch.float32)
    entropies = torch.zeros((rows, response_length), dtype=torch.float32)
    for i, (prompt, leaf) in enumerate(zip(prompts, leaves)):
        if len(prompt) > prompt_length:
            raise ValueError(f"a prompt of {len(prompt)} tokens does not fit rollout.prompt_length={prompt_length}")
        n = len(leaf.token_ids)
        if n > response_length:
            raise ValueError(f"a response of {n} tokens does not fit rollout.response_length={response_length}")
        if prompt:
            prompt_ids[i, prompt_length - len(prompt):] = torch.tensor(prompt)
            prompt_mask[i, prompt_length - len(prompt):] = 1
        response_ids[i, :n] = torch.tensor(leaf.token_ids, dtype=torch.long)
        response_attention[i, :n] = 1
        logprobs[i, :n] = torch.tensor(leaf.logprobs, dtype=torch.float32)
        entropies[i, :n] = torch.tensor(leaf.entropies, dtype=torch.float32)
    padding = torch.tensor([leaf.padding for leaf in leaves], dtype=torch.bool)
    response_mask = response_attention * (~padding).long().unsqueeze(-1)
    attention_mask = torch.cat([prompt_mask, response_attention], dim=1)
    return {"prompts": prompt_ids, "responses": response_ids, "response_mask": response_mask,
            "input_ids": torch.cat([prompt_ids, response_ids], dim=1), "attention_mask": attention_mask,
            "position_ids": compute_position_id_with_mask(attention_mask), "rollout_log_probs": logprobs,
            "rollout_entropies": entropies}
