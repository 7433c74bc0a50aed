"""What every `entropy_sample` backend shares: per-row parameters as tensors, the top-k / top-p thresholds and the
checks on the logits (sampling.py documents the semantics)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ettrl_kernels.noise import row_keys

SampleResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (tokens int64 [B], logprobs, entropies float32 [B])
Param = float | int | torch.Tensor  # a sampling parameter: a python scalar, a 0-dim tensor or one value per row [B]


@dataclass
class RowParams:
    """Per-row sampling parameters as device tensors of shape [B]."""
    inv_temp: torch.Tensor    # float32, 1 / T (1 for greedy rows)
    greedy: torch.Tensor      # bool, T == 0
    top_k: torch.Tensor       # int64, 0 = off
    top_p: torch.Tensor       # float32, 1 = off
    keys: torch.Tensor        # int32 noise keys
    exclude: torch.Tensor     # int64, -1 = nothing excluded
    truncated: bool           # any row with top-k or top-p on
    any_exclude: bool


def _per_row(value: Param, batch: int, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value.to(device=device, dtype=dtype).expand(batch).contiguous()
        if value.shape != (batch,):
            raise ValueError(f"{name} must be a scalar or a tensor of shape [{batch}], got {tuple(value.shape)}")
        return value.to(device=device, dtype=dtype)
    return torch.full((batch,), value, dtype=dtype, device=device)


def row_params(logits: torch.Tensor, temperature: Param, top_k: Param, top_p: Param, seeds: Param,
               seq_ids: Param | None, positions: Param, exclude: Param | None) -> RowParams:
    """Per-row parameters on the logits' device; checked with one device-to-host read (one sync on a GPU)."""
    batch, vocab = logits.shape
    device = logits.device
    temp = _per_row(temperature, batch, torch.float32, device, "temperature")
    greedy = temp == 0
    inv_temp = torch.where(greedy, torch.ones_like(temp), 1.0 / temp)
    k = _per_row(top_k, batch, torch.int64, device, "top_k")
    k = torch.where((k <= 0) | (k >= vocab), torch.zeros_like(k), k)
    p = _per_row(top_p, batch, torch.float32, device, "top_p")
    bad_p = (p <= 0).any()
    p = torch.where(p >= 1, torch.ones_like(p), p)
    if seq_ids is None:
        seq_ids = torch.arange(batch, device=device)
    keys = row_keys(_per_row(seeds, batch, torch.int64, device, "seeds"),
                    _per_row(seq_ids, batch, torch.int64, device, "seq_ids"),
                    _per_row(positions, batch, torch.int64, device, "positions"))
    excl = _per_row(-1 if exclude is None else exclude, batch, torch.int64, device, "exclude")
    flags = torch.stack([(temp < 0).any() | temp.isnan().any(), bad_p, ((excl < -1) | (excl >= vocab)).any(),
                         (~greedy & ((k > 0) | (p < 1))).any(), (excl >= 0).any()])
    bad_temp, bad_p, bad_excl, truncated, any_exclude = flags.tolist()
    if bad_temp:
        raise ValueError("temperature must be >= 0 (0 means greedy)")
    if bad_p:
        raise ValueError("top_p must be in (0, 1]; use top_p=1 to turn it off")
    if bad_excl:
        raise ValueError(f"exclude must be -1 (nothing) or a token id in [0, {vocab})")
    return RowParams(inv_temp, greedy, k, p, keys, excl, truncated, any_exclude)


def truncation_thresholds(logits: torch.Tensor, lse: torch.Tensor, params: RowParams) -> torch.Tensor:
    """Per-row logit threshold of the top-k / top-p set (float32 [B], -inf where nothing is cut).

    Works on the few highest logits of each truncated row (torch.topk), widening the window until the top-p
    mass is covered, so no row is fully sorted unless it has to be (flat distributions with top-p).
    """
    batch, vocab = logits.shape
    thresholds = torch.full((batch,), float("-inf"), device=logits.device)
    rows = torch.nonzero(~params.greedy & ((params.top_k > 0) | (params.top_p < 1))).flatten()
    if rows.numel() == 0:
        return thresholds
    k, p, excl = params.top_k[rows], params.top_p[rows], params.exclude[rows]
    inv_temp, row_lse = params.inv_temp[rows, None], lse[rows, None]
    # top-k alone keeps the k-th value, not where the float32 running sum first reaches the total (a tail a few
    # ulps of the mass small would end the sum early and cut tokens of the top k)
    top_k_only = p >= 1
    sub = logits if rows.numel() == batch else logits[rows]
    rest_mass = _mass_without_excluded(sub, excl, k, inv_temp, row_lse)
    window = min(vocab, max(int(k.max()) + 1, 64))
    while True:
        values, ids = sub.sort(dim=1, descending=True) if window == vocab else sub.topk(window, dim=1)
        values = values.float()
        if bool((excl >= 0).any()):
            values = values.masked_fill(ids == excl[:, None], float("-inf")).sort(dim=1, descending=True).values
        rank = torch.arange(window, device=logits.device)
        in_top_k = (k[:, None] == 0) | (rank[None, :] < k[:, None])
        probs = torch.exp(values * inv_temp - row_lse) * in_top_k
        mass = torch.where(k > 0, probs.sum(1), rest_mass)
        kept = ((probs.cumsum(1) < p[:, None] * mass[:, None]) & in_top_k).sum(1)
        covered = (kept < window) | (window == vocab) | top_k_only
        if bool(covered.all()):
            break
        window = vocab if 8 * window > vocab else 4 * window
    last = kept.clamp(max=window - 1)
    last = torch.where(k > 0, torch.minimum(last, k - 1), last)
    last = torch.where(top_k_only, k - 1, last)
    thresholds[rows] = values.gather(1, last[:, None]).squeeze(1)
    return thresholds


def _mass_without_excluded(logits, excl, k, inv_temp, lse) -> torch.Tensor:
    """Probability mass left after each row's excluded token (1 where nothing is excluded or top-k sums it).

    1 - p(excluded), except where the excluded token holds more than half the mass: there the difference can be
    smaller than the float32 lse's rounding (an ulp of the top logit) and the top-p cut would land wherever that
    error puts it, so those rows sum the other tokens instead (one pass over their logits).
    """
    excluded_logit = logits.gather(1, excl.clamp(min=0)[:, None]).float() * inv_temp - lse
    p_excluded = torch.where(excl[:, None] >= 0, excluded_logit.exp(), 0.0).squeeze(1)
    mass = 1 - p_excluded
    hit = torch.nonzero((p_excluded > 0.5) & (k == 0)).flatten()
    if hit.numel():
        x = logits[hit].float() * inv_temp[hit]
        x[torch.arange(len(hit), device=logits.device), excl[hit]] = float("-inf")
        mass[hit] = torch.exp(torch.logsumexp(x, dim=1) - lse[hit, 0])
    return mass


def check_finite_rows(max_x: torch.Tensor, best: torch.Tensor | None = None) -> None:
    """Raise a clear error for NaN/+inf logits or, given each row's best allowed score, rows where no allowed token
    has nonzero probability (one device read when all is well). Without `best` (before any token is chosen) only
    the logits are checked."""
    bad_logits = max_x.isnan() | (max_x == float("inf"))
    empty = None if best is None else best == float("-inf")
    if not bool((bad_logits if empty is None else bad_logits | empty).any()):
        return
    if bool(bad_logits.any()):
        rows = torch.nonzero(bad_logits).flatten().tolist()
        raise ValueError(f"entropy_sample: logits contain NaN or +inf in rows {rows[:8]}")
    assert empty is not None  # the rows above are fine, so some row is empty
    rows = torch.nonzero(empty).flatten().tolist()
    raise ValueError(f"entropy_sample: no allowed token with nonzero probability in rows {rows[:8]} "
                     "(all logits -inf, or `exclude` removed the only one)")
