"""The policy update of one rollout batch, as verl's actor runs it (docs/algorithms.md section 2).

The batch's samples split into `mini_batches` equal mini-batches (each rank splits its own share: with one
prompt a mini-batch and one rank, a mini-batch is that prompt's n_train responses); `tcfg.ppo_epochs` passes
over them, one optimizer step per mini-batch. The old log-probabilities, and the reference policy's for the
KL term, come from one no-grad forward before the first optimizer step, so later mini-batches are off-policy
and the clip acts. (With one mini-batch and one epoch the old log-probabilities are the new ones, detached:
the same numbers without the extra forward.)

The loss of a mini-batch is the GRPO loss over all of its responses (on every rank), whatever the
micro-batch size: each micro-batch's loss is weighted by its share of the mini-batch's tokens ("token-mean")
or responses ("seq-mean-token-mean") before backward, and multiplied by the world size because
data-parallel backends average gradients over ranks. Padding samples (`pad_samples`) count as neither.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ettrl.loss import grpo_loss
from ettrl.policy import pad_batch, response_stats, shared_prompt_stats
from ettrl.samples import TrainSample

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ettrl.backends import TrainBackend
    from ettrl.config import TrainerConfig

MEANS = ("loss", "pg_loss", "clip_frac", "clip_frac_low", "clip_frac_high", "clip_frac_dual", "approx_kl",
         "ratio_mean", "kl_ref", "policy_entropy", "grad_norm")


def policy_update(backend: TrainBackend, samples: list[TrainSample], tcfg: TrainerConfig, temperature: float,
                  pad_id: int, ref_model: PreTrainedModel | None = None, progress: bool = False,
                  mini_batches: int = 1) -> dict:
    """The optimizer steps of one rollout batch on `samples` (this rank's share), then the lr schedule moves.

    Returns the means over the optimizer steps (ratio_min / ratio_max: extremes; policy_entropy: the policy's
    mean token entropy at the sampling temperature, as the update sees it), "optimizer_steps", "lr", and "inner":
    one metrics dict per optimizer step."""
    if mini_batches < 1 or len(samples) % mini_batches:
        raise ValueError(f"{len(samples)} samples on this rank cannot split into {mini_batches} equal mini-batches; "
                         f"make prompts per rank x rollout.n_train a multiple of the mini-batches per step")
    size = len(samples) // mini_batches
    parts = [samples[i : i + size] for i in range(0, len(samples), size)]
    off_policy = mini_batches > 1 or tcfg.ppo_epochs > 1
    olds = [_fixed_logprobs(backend.model, part, tcfg, temperature, pad_id) if off_policy else None for part in parts]
    refs = [None if ref_model is None else _fixed_logprobs(ref_model, part, tcfg, temperature, pad_id)
            for part in parts]
    inner = []
    steps = [(epoch, i) for epoch in range(tcfg.ppo_epochs) for i in range(len(parts))]
    # pragma: no mutate start (the progress bar's arguments change only what is displayed)
    for epoch, i in tqdm(steps, desc="update", unit="mini-batch", leave=False, disable=not progress or len(steps) < 2,
                         file=sys.stdout):
        # pragma: no mutate end
        inner.append(_mini_batch_step(backend, parts[i], olds[i], refs[i], tcfg, temperature, pad_id, progress))
    backend.advance_schedule()
    return _summarise(inner)


def _mini_batch_step(backend: TrainBackend, part: list[TrainSample], old: list[torch.Tensor] | None,
                     ref: list[torch.Tensor] | None, tcfg: TrainerConfig, temperature: float, pad_id: int,
                     progress: bool) -> dict:
    """One optimizer step on a mini-batch: micro-batches with exact gradient accumulation."""
    device = next(backend.model.parameters()).device
    real = [s for s in part if not s.padding]
    n_tokens, n_seqs = backend.all_reduce_sum([sum(len(s.response_ids) for s in real), len(real)])
    totals: dict[str, float] = {}
    ratio_max, ratio_min = float("-inf"), float("inf")
    starts = range(0, len(part), tcfg.micro_batch_size)
    # pragma: no mutate start (the progress bar's arguments change only what is displayed)
    for start in tqdm(starts, desc="micro-batches", unit="micro-batch", leave=False, disable=not progress,
                      file=sys.stdout):
        # pragma: no mutate end
        end = start + tcfg.micro_batch_size
        loss, metrics, weight = _micro_step(backend, part[start:end], None if old is None else old[start:end],
                                            None if ref is None else ref[start:end], tcfg, temperature, pad_id,
                                            device, n_tokens, n_seqs)
        backend.backward(loss * weight * backend.world_size)
        high, low = metrics.pop("ratio_max"), metrics.pop("ratio_min")
        if weight > 0:
            ratio_max, ratio_min = max(ratio_max, high), min(ratio_min, low)
        for k, v in metrics.items():
            if k in MEANS:
                totals[k] = totals.get(k, 0.0) + v * weight
    grad_norm, lr = backend.step()
    keys = sorted(totals)  # each rank's metrics are already weighted by its share of the whole mini-batch
    totals = dict(zip(keys, backend.all_reduce_sum([totals[k] for k in keys])))
    if ratio_max == float("-inf"):  # only padding here: no ratio to report
        ratio_max = ratio_min = 1.0
    # ratio extremes are this rank's
    return {**totals, "ratio_max": ratio_max, "ratio_min": ratio_min, "grad_norm": grad_norm, "lr": lr}


def _micro_step(backend: TrainBackend, chunk: list[TrainSample], old: list[torch.Tensor] | None,
                ref: list[torch.Tensor] | None, tcfg: TrainerConfig, temperature: float, pad_id: int,
                device: torch.device, n_tokens: float, n_seqs: float) -> tuple[torch.Tensor, dict[str, float], float]:
    logp, entropy = backend.forward(lambda model: _stats(model, chunk, tcfg, temperature, pad_id, device))
    lengths = [len(s.response_ids) for s in chunk]
    mask = _padded([torch.full((n,), 0.0 if s.padding else 1.0, device=device) for s, n in zip(chunk, lengths)])
    adv = _padded([torch.tensor(s.advantages, dtype=torch.float32, device=device) for s in chunk])

    def split(t: torch.Tensor) -> torch.Tensor:
        return _padded(list(torch.split(t, lengths)))

    logp_new = split(logp)
    logp_old = logp_new.detach() if old is None else _padded([t.to(device) for t in old])
    loss, metrics = grpo_loss(logp_new, logp_old, adv, mask, tcfg.eps_low, tcfg.eps_high, tcfg.loss_agg,
                              ref_logp=None if ref is None else _padded([t.to(device) for t in ref]),
                              kl_coef=tcfg.kl_coef, entropies=split(entropy.float()), clip_ratio_c=tcfg.clip_ratio_c)
    metrics["policy_entropy"] = metrics.pop("entropy")  # the trainer's; the rollout's is "entropy"
    real = [s for s in chunk if not s.padding]
    n_real = sum(len(s.response_ids) for s in real) if tcfg.loss_agg == "token-mean" else len(real)
    total = n_tokens if tcfg.loss_agg == "token-mean" else n_seqs
    share = n_real / total if total else 0.0
    return loss, {"loss": loss.item(), **metrics}, share


@torch.no_grad()
def _fixed_logprobs(model: PreTrainedModel, part: list[TrainSample], tcfg: TrainerConfig, temperature: float,
                    pad_id: int) -> list[torch.Tensor]:
    """Per sample, the log-probabilities of its response under `model` now (no grad), chunked like the update."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(part), tcfg.micro_batch_size):
        chunk = part[start : start + tcfg.micro_batch_size]
        logp = _stats(model, chunk, tcfg, temperature, pad_id, device)[0].float()
        out += list(torch.split(logp, [len(s.response_ids) for s in chunk]))
    return out


def _stats(model: PreTrainedModel, chunk: list[TrainSample], tcfg: TrainerConfig, temperature: float, pad_id: int,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, entropies) of the chunk's response tokens in order: each run of samples with one prompt shares
    that prompt's forward (trainer.share_prompt), or the chunk runs as one padded batch."""
    if not tcfg.share_prompt or _checkpointing(model):
        batch = pad_batch([s.prompt_ids for s in chunk], [s.response_ids for s in chunk], pad_id, device)
        return response_stats(model, batch, temperature)
    runs: list[tuple[list[int], list[list[int]]]] = []
    for s in chunk:
        if runs and runs[-1][0] == s.prompt_ids:
            runs[-1][1].append(s.response_ids)
        else:
            runs.append((s.prompt_ids, [s.response_ids]))
    stats = [shared_prompt_stats(model, prompt, responses, pad_id, temperature) for prompt, responses in runs]
    return torch.cat([lp for lp, _ in stats]), torch.cat([h for _, h in stats])


def _summarise(inner: list[dict]) -> dict:
    out = {k: sum(r[k] for r in inner) / len(inner) for k in MEANS if k in inner[0]}
    out["ratio_max"] = max(r["ratio_max"] for r in inner)
    out["ratio_min"] = min(r["ratio_min"] for r in inner)
    out["lr"] = inner[0]["lr"]
    out["optimizer_steps"] = len(inner)
    out["inner"] = inner
    return out


def _checkpointing(model: torch.nn.Module) -> bool:
    """Activation checkpointing recomputes layers without their KV cache, so a shared prompt cannot be used."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _padded(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
