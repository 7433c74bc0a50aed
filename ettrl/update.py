"""One policy update from scored responses: micro-batches, exact gradient accumulation, one optimizer step.

The loss of a step is the GRPO loss over all of the step's responses (on every rank), whatever the
micro-batch size: each micro-batch's loss is weighted by its share of the step's tokens ("token-mean")
or responses ("seq-mean-token-mean") before backward, and multiplied by the world size because
data-parallel backends average gradients over ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import sys

import torch
from tqdm.auto import tqdm

from ettrl.loss import grpo_loss
from ettrl.policy import pad_batch, response_stats, shared_prompt_stats


@dataclass
class TrainSample:
    prompt_ids: list[int]
    response_ids: list[int]
    advantages: list[float]  # one per response token


def policy_update(backend, samples: list[TrainSample], tcfg, temperature: float, pad_id: int,
                  ref_model=None, progress: bool = False) -> dict[str, float]:
    """Apply one optimizer step on `samples` (this rank's share); returns loss and optimizer metrics."""
    model = backend.model
    device = next(model.parameters()).device
    n_tokens, n_seqs = backend.all_reduce_sum([sum(len(s.response_ids) for s in samples), len(samples)])
    totals = {}
    starts = range(0, len(samples), tcfg.micro_batch_size)
    for start in tqdm(starts, desc="update", unit="micro-batch", leave=False, disable=not progress, file=sys.stdout):
        chunk = samples[start : start + tcfg.micro_batch_size]
        loss, metrics, weight = _micro_step(backend, chunk, tcfg, temperature, pad_id, device, ref_model, n_tokens,
                                            n_seqs)
        backend.backward(loss * weight * backend.world_size)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v * weight
    grad_norm, lr = backend.step()
    keys = sorted(totals)  # each rank's metrics are already weighted by its share of the whole step
    totals = dict(zip(keys, backend.all_reduce_sum([totals[k] for k in keys])))
    return {**totals, "grad_norm": grad_norm, "lr": lr}


def _micro_step(backend, chunk, tcfg, temperature, pad_id, device, ref_model, n_tokens, n_seqs):
    logp, entropy = backend.forward(lambda model: _stats(model, chunk, tcfg, temperature, pad_id, device))
    ref = None
    if ref_model is not None:
        with torch.no_grad():
            ref = _stats(ref_model, chunk, tcfg, temperature, pad_id, device)[0]
    lengths = [len(s.response_ids) for s in chunk]
    mask = _padded([torch.ones(n, device=device) for n in lengths])
    adv = _padded([torch.tensor(s.advantages, dtype=torch.float32, device=device) for s in chunk])
    split = lambda t: _padded(list(torch.split(t, lengths)))  # noqa: E731
    logp_new = split(logp)
    loss, metrics = grpo_loss(logp_new, logp_new.detach(), adv, mask, tcfg.eps_low, tcfg.eps_high, tcfg.loss_agg,
                              ref_logp=None if ref is None else split(ref), kl_coef=tcfg.kl_coef,
                              entropies=split(entropy.float()))
    share = sum(lengths) / n_tokens if tcfg.loss_agg == "token-mean" else len(chunk) / n_seqs
    metrics = {"loss": loss.item(), **{k: v for k, v in metrics.items() if k not in ("ratio_max", "entropy")}}
    return loss, metrics, share


def _stats(model, chunk, tcfg, temperature, pad_id, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, entropies) of the chunk's response tokens in order: each run of samples with one prompt shares
    that prompt's forward (trainer.share_prompt), or the chunk runs as one padded batch."""
    if not tcfg.share_prompt or _checkpointing(model):
        batch = pad_batch([s.prompt_ids for s in chunk], [s.response_ids for s in chunk], pad_id, device)
        return response_stats(model, batch, temperature)
    runs = []
    for s in chunk:
        if runs and runs[-1][0] == s.prompt_ids:
            runs[-1][1].append(s.response_ids)
        else:
            runs.append((s.prompt_ids, [s.response_ids]))
    stats = [shared_prompt_stats(model, prompt, responses, pad_id, temperature) for prompt, responses in runs]
    return torch.cat([lp for lp, _ in stats]), torch.cat([h for _, h in stats])


def _checkpointing(model) -> bool:
    """Activation checkpointing recomputes layers without their KV cache, so a shared prompt cannot be used."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _padded(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
