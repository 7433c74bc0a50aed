"""GRPO loss: hand-computed values and gradients against a straightforward per-token loop reference."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ettrl.loss import grpo_loss


def reference_loss(logp_new, logp_old, adv, mask, eps_low, eps_high, agg, ref_logp=None, kl_coef=0.0):
    """Per-token Python loop: the textbook PPO objective, written without vectorisation."""
    B, T = logp_new.shape
    seq_losses, token_terms = [], []
    for b in range(B):
        terms = []
        for t in range(T):
            if not mask[b, t]:
                continue
            a = adv[b] if adv.dim() == 1 else adv[b, t]
            ratio = torch.exp(logp_new[b, t] - logp_old[b, t])
            term = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
            if ref_logp is not None and kl_coef:
                d = ref_logp[b, t] - logp_new[b, t]
                term = term + kl_coef * (torch.exp(d) - d - 1)
            terms.append(term)
        token_terms += terms
        if terms:
            seq_losses.append(sum(terms) / len(terms))
    if agg == "token-mean":
        return sum(token_terms) / len(token_terms)
    return sum(seq_losses) / len(seq_losses)


def _batch(seed, B=3, T=5, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    logp_old = -torch.rand(B, T, generator=g) * 3
    logp_new = logp_old + 0.4 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g) if per_token_adv else torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    ref = logp_old + 0.2 * torch.randn(B, T, generator=g)
    return logp_new, logp_old, adv, mask, ref


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), agg=st.sampled_from(["token-mean", "seq-mean-token-mean"]),
       per_token_adv=st.booleans(), eps_low=st.sampled_from([0.1, 0.2]), eps_high=st.sampled_from([0.2, 0.28]),
       kl_coef=st.sampled_from([0.0, 0.1]))
def test_loss_and_gradient_match_reference(seed, agg, per_token_adv, eps_low, eps_high, kl_coef):
    logp_new, logp_old, adv, mask, ref = _batch(seed, per_token_adv=per_token_adv)
    x = logp_new.clone().requires_grad_(True)
    loss, _ = grpo_loss(x, logp_old, adv, mask, eps_low, eps_high, agg, ref_logp=ref, kl_coef=kl_coef)
    loss.backward()
    y = logp_new.clone().requires_grad_(True)
    expected = reference_loss(y, logp_old, adv, mask, eps_low, eps_high, agg, ref, kl_coef)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(x.grad, y.grad, atol=1e-6)


def test_on_policy_loss_and_gradient_by_hand():
    """ratio = 1: loss = -mean_tokens(A); d loss / d logp_new = -A / N on every unmasked token."""
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.1], [0.9, 0.3, 0.2]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, -1.0])
    x = logp.clone().requires_grad_(True)
    loss, metrics = grpo_loss(x, logp, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-(2 + 2 - 1 - 1 - 1) / 5)
    assert torch.allclose(x.grad, torch.tensor([[-2.0, -2.0, 0.0], [1.0, 1.0, 1.0]]) / 5)
    assert metrics["clip_frac"] == 0.0 and metrics["ratio_mean"] == pytest.approx(1.0)
    assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-7)
    # seq-mean-token-mean: (-2 + 1) / 2
    loss, _ = grpo_loss(logp, logp, adv, mask, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(-0.5)


def test_clipping_by_hand():
    logp_old = torch.zeros(1, 4)
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    x = torch.log(ratios).requires_grad_(True)
    loss, metrics = grpo_loss(x, logp_old, adv, torch.ones(1, 4), eps_low=0.2, eps_high=0.2)
    loss.backward()
    # token terms: A>0 r=1.5 -> clipped 1.2; A>0 r=0.5 -> 0.5 (min picks unclipped);
    #              A<0 r=1.5 -> 1.5 (unclipped, pessimistic); A<0 r=0.5 -> clipped 0.8
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 1.5 - 0.8) / 4)
    assert torch.allclose(x.grad, torch.tensor([[0.0, -0.5, 1.5, 0.0]]) / 4)
    assert metrics["clip_frac"] == pytest.approx(0.5)
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    assert metrics["ratio_max"] == pytest.approx(1.5)


def test_asymmetric_clip_range():
    ratios = torch.tensor([[1.25]])
    for eps_high, expected in ((0.2, 1.2), (0.28, 1.25)):
        loss, _ = grpo_loss(torch.log(ratios), torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1),
                            eps_low=0.2, eps_high=eps_high)
        assert loss.item() == pytest.approx(-expected)


def test_k3_kl_to_reference_by_hand():
    logp = torch.zeros(1, 2)
    ref = torch.tensor([[0.0, math.log(2.0)]])  # d = ref - logp = [0, ln 2] -> k3 = [0, 2 - ln2 - 1]
    k3 = 1 - math.log(2.0)
    loss, metrics = grpo_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), ref_logp=ref, kl_coef=0.5)
    assert loss.item() == pytest.approx(0.5 * k3 / 2)
    assert metrics["kl_ref"] == pytest.approx(k3 / 2)
    loss, _ = grpo_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), ref_logp=ref, kl_coef=0.0)
    assert loss.item() == 0.0  # off by default: reported, not added


def test_metrics_include_entropy_and_ignore_masked_tokens():
    logp_new, logp_old, adv, mask, _ = _batch(0)
    entropies = torch.rand_like(logp_new)
    _, metrics = grpo_loss(logp_new, logp_old, adv, mask, entropies=entropies)
    assert metrics["entropy"] == pytest.approx(entropies[mask].mean().item(), rel=1e-5)
    ratio = torch.exp(logp_new - logp_old)[mask]
    assert metrics["ratio_mean"] == pytest.approx(ratio.mean().item(), rel=1e-5)
    assert metrics["approx_kl"] == pytest.approx((ratio - 1 - torch.log(ratio)).mean().item(), rel=1e-4)
    assert all(isinstance(v, float) for v in metrics.values())


def test_empty_responses_are_skipped_in_seq_mean():
    logp = torch.zeros(2, 2)
    mask = torch.tensor([[1, 1], [0, 0]])
    loss, _ = grpo_loss(logp, logp, torch.tensor([1.0, 5.0]), mask, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(-1.0)


def test_bad_inputs_get_clear_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="agg"):
        grpo_loss(x, x, torch.zeros(2), x, agg="sum")
    with pytest.raises(ValueError, match="logp_old"):
        grpo_loss(x, torch.zeros(2, 4), torch.zeros(2), x)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(x, x, torch.zeros(3), x)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        grpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3))


def test_bf16_inputs_are_computed_in_float32():
    logp_new, logp_old, adv, mask, _ = _batch(1)
    x = logp_new.bfloat16().requires_grad_(True)
    loss, _ = grpo_loss(x, logp_old.bfloat16(), adv, mask)
    loss.backward()
    expected, _ = grpo_loss(logp_new.bfloat16().float(), logp_old.bfloat16().float(), adv, mask)
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_low_var_kl_by_hand_on_two_distributions_clamp_included():
    """verl's low_var_kl: k3 = q/p - log(q/p) - 1 per sampled token (p policy, q reference), clamped to [-10, 10]."""
    from ettrl.loss import low_var_kl

    p = torch.tensor([0.5, 0.3, 0.2])  # the policy's distribution over 3 tokens
    q = torch.tensor([0.25, 0.25, 0.5])  # the reference's
    tokens = [0, 1, 2]  # the sampled response
    by_hand = [0.5 - math.log(0.5) - 1,  # q/p = 0.25 / 0.5
               (0.25 / 0.3) - math.log(0.25 / 0.3) - 1,
               (0.5 / 0.2) - math.log(0.5 / 0.2) - 1]
    logp, ref = torch.log(p[tokens]).unsqueeze(0), torch.log(q[tokens]).unsqueeze(0)
    torch.testing.assert_close(low_var_kl(logp, ref), torch.tensor([by_hand]), rtol=1e-6, atol=1e-6)

    # a token the reference finds e^20 times likelier than the policy: k3 = e^20 - 21, clamped to 10
    far_logp, far_ref = torch.tensor([[-25.0, math.log(0.5)]]), torch.tensor([[-5.0, math.log(0.25)]])
    assert low_var_kl(far_logp, far_ref)[0].tolist() == pytest.approx([10.0, by_hand[0]], rel=1e-6)
    x = far_logp.clone().requires_grad_(True)
    loss, metrics = grpo_loss(x, far_logp, torch.zeros(1), torch.ones(1, 2), ref_logp=far_ref, kl_coef=0.001)
    loss.backward()
    assert loss.item() == pytest.approx(0.001 * (10.0 + by_hand[0]) / 2, rel=1e-6)
    assert metrics["kl_ref"] == pytest.approx((10.0 + by_hand[0]) / 2, rel=1e-6)
    # d k3 / d logp = 1 - q/p: zero for the clamped token, 1 - 0.5 for the other; token-mean over 2, times 0.001
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 0.001 * 0.5 / 2]]))


def test_dual_clip_bounds_negative_advantages_like_verl():
    """clip_ratio_c = 3: for A < 0 the token loss is min(max(-rA, -clip(r)A), -3A); A > 0 is untouched."""
    ratios = torch.tensor([[4.0, 2.0, 4.0]])
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    x = torch.log(ratios).requires_grad_(True)
    loss, metrics = grpo_loss(x, torch.zeros(1, 3), adv, torch.ones(1, 3), clip_ratio_c=3.0)
    loss.backward()
    # A=-1, r=4: max(4, 1.2)=4 > 3 -> 3 (no gradient); A=-1, r=2: 2; A=+1, r=4: clipped to -1.2
    assert loss.item() == pytest.approx((3.0 + 2.0 - 1.2) / 3)
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 2.0 / 3, 0.0]]))
    assert metrics["clip_frac_dual"] == pytest.approx(1 / 3)
    assert metrics["clip_frac_high"] == pytest.approx(1 / 3) and metrics["ratio_min"] == pytest.approx(2.0)


def test_defaults_clip_to_0_8_and_1_2_and_leave_the_kl_out_of_the_loss():
    """Defaults eps_low = eps_high = 0.2, kl_coef = 0: A=+1 at r=1.5 counts 1.2, A=-1 at r=0.5 counts 0.8."""
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0]])
    loss, metrics = grpo_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2))
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert metrics["pg_loss"] == pytest.approx((-1.2 + 0.8) / 2)
    ref = torch.zeros(1, 2)  # k3 > 0 on both tokens: reported, not added without kl_coef
    loss, metrics = grpo_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2), ref_logp=ref)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2) and metrics["kl_ref"] > 0.05


@pytest.mark.parametrize("name", ["logp_old", "mask", "ref_logp", "entropies"])
def test_shape_error_names_the_argument_to_fix(name):
    """A [1, 3] tensor would broadcast against [2, 3]: each argument is checked, and the message names it."""
    x = torch.zeros(2, 3)
    args = {"logp_old": x, "mask": torch.ones(2, 3), "ref_logp": x, "entropies": x, name: torch.zeros(1, 3)}
    with pytest.raises(ValueError, match=rf"^{name} has shape \(1, 3\), expected \(2, 3\) like logp_new$"):
        grpo_loss(x, args["logp_old"], torch.zeros(2), args["mask"], ref_logp=args["ref_logp"],
                  entropies=args["entropies"])


def test_dual_clip_bound_is_c_times_minus_a_only_for_negative_advantages():
    """clip_ratio_c = 3, bound -3A: A=-2, r=4: max(8, 2.4) = 8 -> 6; A=-0.5, r=4: 2 -> 1.5;
    A=+0.5, r=1: -0.5 stays (the bound -1.5 is for A < 0 only); A=0: 0."""
    x = torch.log(torch.tensor([[4.0, 4.0, 1.0, 1.0]])).requires_grad_(True)
    adv = torch.tensor([[-2.0, -0.5, 0.5, 0.0]])
    loss, metrics = grpo_loss(x, torch.zeros(1, 4), adv, torch.ones(1, 4), clip_ratio_c=3.0)
    loss.backward()
    assert loss.item() == pytest.approx((6.0 + 1.5 - 0.5 + 0.0) / 4)
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 0.0, -0.5 / 4, 0.0]]))
    assert metrics["clip_frac_dual"] == pytest.approx(2 / 4)


def test_dual_clip_takes_over_only_strictly_above_the_bound():
    """A=-1, c = r of the first token exactly: that token keeps its loss r and its gradient; r slightly above c
    is bounded to c (no gradient), slightly below keeps r."""
    x = (math.log(3.0) + torch.tensor([[0.0, 0.01, -0.01]])).requires_grad_(True)
    r = torch.exp(x.detach())[0]
    c = r[0].item()  # a float32 value: -c * A and the token loss r * 1 are the same float
    loss, metrics = grpo_loss(x, torch.zeros(1, 3), -torch.ones(1), torch.ones(1, 3), clip_ratio_c=c)
    loss.backward()
    assert loss.item() == pytest.approx((c + c + r[2].item()) / 3)
    torch.testing.assert_close(x.grad, torch.tensor([[r[0].item(), 0.0, r[2].item()]]) / 3)
    assert metrics["clip_frac_dual"] == pytest.approx(1 / 3)


def test_clip_fractions_by_side_and_ratio_range_over_live_tokens():
    """Default eps 0.2. Live: A=+1 r=1.5 (clipped high), A=+1 r=0.5 (not clipped: min takes r A), A=-1 r=0.5
    (clipped low), A=-1 r=1.5, A=+-1 r=1, A=+1 r=1.1, A=-1 r=0.9 (none clipped). Masked: r=3 and r=0.1."""
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.0, 1.0, 1.1, 0.9, 3.0, 0.1]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]])
    _, metrics = grpo_loss(torch.log(ratios), torch.zeros(1, 10), adv, mask)
    assert metrics["clip_frac"] == pytest.approx(2 / 8)
    assert metrics["clip_frac_low"] == pytest.approx(1 / 8) and metrics["clip_frac_high"] == pytest.approx(1 / 8)
    assert metrics["ratio_max"] == pytest.approx(1.5) and metrics["ratio_min"] == pytest.approx(0.5)


def test_all_masked_batch_reports_zero_ratios_and_one_live_token_reports_its_own():
    logp = torch.log(torch.tensor([[2.0, 0.5]]))
    entropies = torch.tensor([[0.7, 0.3]])
    loss, metrics = grpo_loss(logp, torch.zeros(1, 2), torch.ones(1), torch.zeros(1, 2), entropies=entropies)
    assert loss.item() == 0.0
    assert (metrics["ratio_max"], metrics["ratio_min"], metrics["ratio_mean"]) == (0.0, 0.0, 0.0)
    _, metrics = grpo_loss(logp, torch.zeros(1, 2), torch.ones(1), torch.tensor([[1, 0]]), entropies=entropies)
    assert metrics["entropy"] == pytest.approx(0.7) and metrics["ratio_mean"] == pytest.approx(2.0)
    assert metrics["ratio_max"] == pytest.approx(2.0) and metrics["ratio_min"] == pytest.approx(2.0)
