"""The GRPO / PPO clipped surrogate loss with optional low_var_kl to a reference (docs/algorithms.md section 2)."""
import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean")


def grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              eps_low: float = 0.2, eps_high: float = 0.2, agg: str = "token-mean",
              ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
              entropies: torch.Tensor | None = None,
              clip_ratio_c: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = exp(logp_new - logp_old).

    logp_new/logp_old/mask (and ref_logp, entropies) are [B, T]; advantages are [B] (per response) or [B, T].
    agg "token-mean": mean over all unmasked tokens of the batch; "seq-mean-token-mean": mean per response,
    then over responses (responses without tokens are skipped). With ref_logp and kl_coef > 0, adds
    kl_coef * low_var_kl per token before aggregation: k3 = exp(ref - logp) - (ref - logp) - 1 clamped to
    [-10, 10], as verl's kl_penalty. clip_ratio_c > 1 turns on verl's dual clip: for A < 0 the per-token loss
    is at most -clip_ratio_c * A.
    Returns the scalar loss and float metrics: pg_loss, clip_frac (either bound), clip_frac_low (r below
    1 - eps_low with A < 0), clip_frac_high (r above 1 + eps_high with A > 0), clip_frac_dual, approx_kl
    (k3 of old vs new: r - 1 - log r), ratio_mean, ratio_min, ratio_max, and kl_ref / entropy when those
    inputs are given. Metrics are token means.
    """
    _check(logp_new, logp_old, advantages, mask, agg, ref_logp, entropies)
    logp_new = logp_new.float()  # bf16 log-probs lose the small differences the ratio is made of
    mask = mask.float()
    adv = advantages.detach().float()
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    log_ratio = logp_new - logp_old.detach().float()
    ratio = torch.exp(log_ratio)
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    per_token = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(per_token, dtype=torch.bool)
    if clip_ratio_c:
        bound = -clip_ratio_c * adv.expand_as(per_token)
        dual = (adv < 0) & (per_token > bound)
        per_token = torch.where(dual, bound, per_token)
    pg_loss = _aggregate(per_token, mask, agg)
    loss = pg_loss
    metrics = {"pg_loss": pg_loss.item()}
    if ref_logp is not None:
        kl = low_var_kl(logp_new, ref_logp.detach().float())
        if kl_coef:
            loss = loss + kl_coef * _aggregate(kl, mask, agg)
        metrics["kl_ref"] = _masked_mean(kl, mask)
    with torch.no_grad():
        is_clipped = clipped > unclipped
        metrics["clip_frac"] = _masked_mean(is_clipped.to(mask.dtype), mask)
        metrics["clip_frac_low"] = _masked_mean((is_clipped & (ratio < 1)).to(mask.dtype), mask)
        metrics["clip_frac_high"] = _masked_mean((is_clipped & (ratio > 1)).to(mask.dtype), mask)
        metrics["clip_frac_dual"] = _masked_mean(dual.to(mask.dtype), mask)
        metrics["approx_kl"] = _masked_mean(_k3(log_ratio), mask)  # KL(old || new), samples from old
        metrics["ratio_mean"] = _masked_mean(ratio, mask)
        live = mask > 0
        metrics["ratio_max"] = ratio.masked_fill(~live, float("-inf")).max().item() if live.any() else 0.0
        metrics["ratio_min"] = ratio.masked_fill(~live, float("inf")).min().item() if live.any() else 0.0
        if entropies is not None:
            metrics["entropy"] = _masked_mean(entropies.float(), mask)
    return loss, metrics


def low_var_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """verl's kl_penalty "low_var_kl": k3 of the reference vs the policy, per token, clamped to [-10, 10]."""
    return _k3(ref_logp - logp).clamp(min=-10, max=10)


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3 estimator exp(x) - x - 1 of KL, x = log(p_other / p): non-negative, unbiased."""
    return torch.exp(log_ratio) - log_ratio - 1


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    if agg == "token-mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    tokens = mask.sum(dim=1)
    per_seq = (per_token * mask).sum(dim=1) / tokens.clamp(min=1)
    has_tokens = (tokens > 0).to(per_seq.dtype)
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return ((values.detach() * mask).sum() / mask.sum().clamp(min=1)).item()


def _check(logp_new, logp_old, advantages, mask, agg, ref_logp, entropies):
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    if logp_new.dim() != 2:
        raise ValueError(f"logp_new must be [B, T], got shape {tuple(logp_new.shape)}")
    for name, t in (("logp_old", logp_old), ("mask", mask), ("ref_logp", ref_logp), ("entropies", entropies)):
        if t is not None and t.shape != logp_new.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(logp_new.shape)} like logp_new")
    if advantages.shape not in (logp_new.shape[:1], logp_new.shape):
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(logp_new.shape)}, "
                         f"got {tuple(advantages.shape)}")
