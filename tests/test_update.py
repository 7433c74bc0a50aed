"""The RL update as verl runs it: mini-batches with old log-probabilities from before the first optimizer step,
against a plain reference written here from the formulas; fp32 master weights for bf16 models; zero-weight
padding that changes nothing."""
import copy
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ettrl.backends.torch_backend import TorchBackend  # noqa: E402
from ettrl.config import TrainerConfig  # noqa: E402
from ettrl.loss import grpo_loss  # noqa: E402
from ettrl.policy import load_policy, pad_batch, response_stats  # noqa: E402
from ettrl.samples import TrainSample, pad_samples  # noqa: E402
from ettrl.update import _checkpointing, policy_update  # noqa: E402
from tiny_models import make_tiny_policy  # noqa: E402

EPS = 0.2
LR = 1e-3  # large, so that the first optimizer step moves the second mini-batch off-policy by more than EPS
TEMPERATURE = 1.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_policy(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def fresh(model_dir):
    """fresh(dtype): a new copy of the tiny policy (loaded once per dtype; copies are cheap)."""
    loaded = {}

    def make(dtype: str = "float32"):
        if dtype not in loaded:
            loaded[dtype] = load_policy(model_dir, dtype)[0]
        return copy.deepcopy(loaded[dtype])

    return make


def two_mini_batches() -> list[list[TrainSample]]:
    """Two prompts x two responses. Mini-batch 2 repeats mini-batch 1's short response X with its positive
    advantage: after step 1 pushed X up, X's ratio exceeds 1 + EPS, so its clipped term has no gradient."""
    p1, p2 = [5, 17, 99, 42], [7, 8, 200]
    x = TrainSample(p1, [33, 61], [1.0, 1.0])
    y = TrainSample(p1, [70, 12, 5, 9], [-1.0] * 4)
    z = TrainSample(p2, [120, 3, 44], [-0.5] * 3)
    x_again = TrainSample(p1, [33, 61], [1.0, 1.0])
    return [[x, y], [x_again, z]]


def response_logprobs(model, samples: list[TrainSample]) -> list[torch.Tensor]:
    """Per sample, log p(response token | prefix) at TEMPERATURE: one padded forward of the samples (the
    policy's forward, tested against transformers in test_policy.py)."""
    batch = pad_batch([s.prompt_ids for s in samples], [s.response_ids for s in samples], 0, "cpu")
    return list(torch.split(response_stats(model, batch, TEMPERATURE)[0], batch["lengths"]))


def token_loss(logp_new, logp_old, a: float) -> torch.Tensor:
    """The clipped surrogate per token, written piecewise: a clipped token is a constant (no gradient)."""
    r = torch.exp(logp_new - logp_old)
    out = []
    for rt in r:
        if a > 0 and rt > 1 + EPS:
            out.append(torch.tensor(-(1 + EPS) * a))
        elif a < 0 and rt < 1 - EPS:
            out.append(torch.tensor(-(1 - EPS) * a))
        else:
            out.append(-rt * a)
    return torch.stack(out)


def reference_update(model, mini_batches, tcfg):
    """verl's actor loop from the formulas: old log-probs first, then per mini-batch token-mean loss, backward,
    clip the gradient norm, one AdamW step (the learning rate does not move inside the rollout batch)."""
    with torch.no_grad():
        old = [response_logprobs(model, mb) for mb in mini_batches]
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay)
    losses, ratios, clipped_grads = [], [], []
    for mb, mb_old in zip(mini_batches, old):
        if losses:  # mini-batch 2: the gradient of X's term alone, through ettrl's grpo_loss
            x_new = response_logprobs(model, mb[:1])[0][None]
            grpo_loss(x_new, mb_old[0][None], torch.tensor(mb[0].advantages[:1]), torch.ones_like(x_new), EPS,
                      EPS)[0].backward()
            clipped_grads.append(max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None))
            opt.zero_grad()
        new = response_logprobs(model, mb)
        loss = torch.cat([token_loss(lp, lo, s.advantages[0]) for s, lp, lo in zip(mb, new, mb_old)]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), tcfg.grad_clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        ratios.append([torch.exp(lp - lo).detach() for lp, lo in zip(new, mb_old)])
    return losses, ratios, clipped_grads


@pytest.mark.parametrize("share_prompt, micro_batch_size", [(False, 2), (True, 1)],
                         ids=["one-forward-per-mini-batch", "shared-prompt-micro-batches"])
def test_two_mini_batches_match_the_formulas(fresh, share_prompt, micro_batch_size):
    """With one padded forward per mini-batch the gradients are the reference's, so the parameters agree to
    1e-5 after two large steps. Micro-batches and shared prompts round differently, and Adam turns a rounding
    difference in a near-zero gradient into a step of up to lr: that path is held to the losses and ratios."""
    tcfg = TrainerConfig(lr=LR, warmup_ratio=0.0, grad_clip=1.0, micro_batch_size=micro_batch_size,
                         share_prompt=share_prompt, prompts_per_step=2, mini_batch_prompts=1, eps_low=EPS,
                         eps_high=EPS)
    mbs = two_mini_batches()
    model = fresh()
    out = policy_update(TorchBackend(model, tcfg, total_steps=10), [s for mb in mbs for s in mb], tcfg,
                        TEMPERATURE, 0, mini_batches=2)

    ref_model = fresh()
    ref_losses, ref_ratios, x_grad = reference_update(ref_model, mbs, tcfg)

    first, second = out["inner"]
    assert out["optimizer_steps"] == 2 and first["lr"] == second["lr"] == LR
    assert first["ratio_min"] == pytest.approx(1.0, abs=1e-6) and first["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert first["clip_frac"] == 0.0
    assert abs(second["ratio_mean"] - 1) > 1e-2, "the second mini-batch is off-policy"
    x_ratio = ref_ratios[1][0]
    assert (x_ratio > 1 + EPS).all(), f"the test needs X clipped in mini-batch 2, got ratios {x_ratio}"
    assert x_grad == [0.0], "a token clipped on its advantage's side moves nothing"
    z_ratio = ref_ratios[1][1]
    assert second["clip_frac_high"] == pytest.approx(2 / 5) and second["clip_frac_low"] == pytest.approx(
        (z_ratio < 1 - EPS).float().sum().item() / 5)  # X's 2 of the mini-batch's 5 tokens
    all_ratios = torch.cat(ref_ratios[1])
    assert second["ratio_mean"] == pytest.approx(all_ratios.mean().item(), rel=1e-5)
    assert second["ratio_max"] == pytest.approx(all_ratios.max().item(), rel=1e-5)
    for got, want in zip((first["loss"], second["loss"]), ref_losses):
        assert got == pytest.approx(want, abs=1e-5)
    initial = fresh()
    moved = max((p - q).abs().max().item() for p, q in zip(ref_model.parameters(), initial.parameters()))
    assert moved > LR / 2, "the update must move the weights for the comparison to mean anything"
    if not share_prompt:
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_one_mini_batch_two_epochs_is_off_policy_in_the_second(fresh):
    tcfg = TrainerConfig(lr=LR, warmup_ratio=0.0, micro_batch_size=2, ppo_epochs=2, eps_low=EPS, eps_high=EPS)
    model = fresh()
    out = policy_update(TorchBackend(model, tcfg, total_steps=10), two_mini_batches()[0], tcfg, TEMPERATURE, 0)
    assert out["optimizer_steps"] == 2
    assert out["inner"][0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert abs(out["inner"][1]["ratio_mean"] - 1) > 1e-3


@pytest.mark.parametrize("micro_batch_size", [2, 3], ids=["fillers-apart", "fillers-beside-real"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_padding_changes_nothing(fresh, micro_batch_size, agg):
    """Zero-weight fillers: the same loss, gradient and weights as the real samples alone (bit for bit when the
    fillers have micro-batches of their own; a filler beside real samples changes the padded batch's shape)."""
    tcfg = TrainerConfig(lr=1e-3, warmup_ratio=0.0, micro_batch_size=micro_batch_size, loss_agg=agg)
    x, y = two_mini_batches()[0]
    padded = pad_samples([x, y], 5)
    assert [s.padding for s in padded] == [False, False, True, True, True]
    runs = []
    for samples in ([x, y], padded):
        model = fresh()
        runs.append((policy_update(TorchBackend(model, tcfg, 10), samples, tcfg, TEMPERATURE, 0),
                     [p.detach().clone() for p in model.parameters()]))
    (real, real_w), (pad, pad_w) = runs
    for key in ("loss", "pg_loss", "grad_norm", "ratio_mean", "approx_kl", "ratio_min", "ratio_max"):
        assert pad[key] == pytest.approx(real[key], rel=1e-6, abs=1e-7), key  # a filler-only micro-batch has no ratio
    for a, b in zip(real_w, pad_w):
        if micro_batch_size == 2:
            assert torch.equal(a, b)
        else:  # Adam turns rounding in a near-zero gradient into up to ~lr
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_bf16_parameters_train_through_fp32_masters(fresh):
    """At lr 5e-7 an AdamW step (~lr per weight) is below bf16 spacing: the fp32 master moves, the model holds
    the master's bf16 rounding."""
    lr = 5e-7
    tcfg = TrainerConfig(lr=lr, warmup_ratio=0.0, micro_batch_size=2)
    model = fresh("bfloat16")
    initial = [p.detach().float().clone() for p in model.parameters()]
    backend = TorchBackend(model, tcfg, total_steps=10)
    assert backend.master is not None and all(m.dtype == torch.float32 for m in backend.master)
    policy_update(backend, two_mini_batches()[0], tcfg, TEMPERATURE, 0)
    step = max((m - i).abs().max().item() for m, i in zip(backend.master, initial))
    assert step == pytest.approx(lr, rel=0.2), "Adam's first step moves a weight with a gradient by ~lr"
    for p, m in zip(model.parameters(), backend.master):
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), m.to(torch.bfloat16))
    state = backend.state_dict()
    again = TorchBackend(fresh("bfloat16"), tcfg, total_steps=10)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again.master, backend.master)), "a checkpoint keeps the masters"


def test_fp32_parameters_need_no_master(fresh):
    model = fresh()
    assert TorchBackend(model, TrainerConfig(), total_steps=1).master is None


def test_pad_samples_rejects_what_it_cannot_pad():
    s = TrainSample([1], [2], [0.5])
    with pytest.raises(ValueError, match="^pad_samples needs at least one real sample to copy$"):
        pad_samples([], 2)
    with pytest.raises(ValueError, match="^3 samples are more than the 2 to pad to$"):
        pad_samples([s, s, s], 2)
    assert pad_samples([s, s], 2) == [s, s], "already full: nothing to add"
    filler = pad_samples([s], 2)[1]
    assert filler.padding and filler.advantages == [0.0] and filler.response_ids == [2]


KL = 0.5  # large, so that the KL term is a visible part of the loss


def seq_mean_kl_reference(model, ref_model, mini_batches, tcfg):
    """The update with a KL term from the formulas, loss_agg seq-mean-token-mean: old and reference log-probs
    before the first step; per mini-batch the mean over responses of the token mean of the clipped surrogate
    plus KL * k3, k3 = exp(ref - new) - (ref - new) - 1; backward, clip, one AdamW step. Returns per step
    (loss, its surrogate part)."""
    with torch.no_grad():
        old = [response_logprobs(model, mb) for mb in mini_batches]
        ref = [response_logprobs(ref_model, mb) for mb in mini_batches]
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay)
    out = []
    for mb, mb_old, mb_ref in zip(mini_batches, old, ref):
        new = response_logprobs(model, mb)
        pg = [token_loss(lp, lo, s.advantages[0]).mean() for s, lp, lo in zip(mb, new, mb_old)]
        k3 = [(torch.exp(r - lp) - (r - lp) - 1).mean() for lp, r in zip(new, mb_ref)]
        loss = torch.stack([a + KL * b for a, b in zip(pg, k3)]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), tcfg.grad_clip)
        opt.step()
        opt.zero_grad()
        out.append((loss.item(), torch.stack(pg).mean().item()))
    return out


def test_kl_to_a_reference_model_over_two_mini_batches(fresh):
    """Each mini-batch's KL term uses the reference model's log-probabilities of that mini-batch's samples,
    micro-batch by micro-batch (one sample each here); the first step's surrogate is 0 (A = +1 and -1, r = 1),
    so its loss is the KL term alone."""
    tcfg = TrainerConfig(lr=LR, warmup_ratio=0.0, micro_batch_size=1, eps_low=EPS, eps_high=EPS, kl_coef=KL,
                         loss_agg="seq-mean-token-mean")
    reference = fresh()
    with torch.no_grad():  # a reference policy away from the initial one
        g = torch.Generator().manual_seed(0)
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    mbs = two_mini_batches()
    out = policy_update(TorchBackend(fresh(), tcfg, total_steps=10), [s for mb in mbs for s in mb], tcfg,
                        TEMPERATURE, 0, ref_model=reference, mini_batches=2)
    want = seq_mean_kl_reference(fresh(), reference, mbs, tcfg)
    assert want[0][1] == pytest.approx(0.0, abs=1e-6) and want[0][0] > 0.01, "the KL term must matter"
    for step, (loss, pg) in zip(out["inner"], want):
        assert step["loss"] == pytest.approx(loss, abs=1e-5)
        assert step["pg_loss"] == pytest.approx(pg, abs=1e-5)


@pytest.mark.parametrize("mini_batches, ppo_epochs, no_grad_forwards, grad_forwards",
                         [(1, 1, 0, 1), (2, 1, 2, 2), (1, 2, 1, 2)])
def test_old_logprobs_are_a_forward_only_when_off_policy(fresh, mini_batches, ppo_epochs, no_grad_forwards,
                                                         grad_forwards):
    """One mini-batch, one epoch: the old log-probabilities are the new ones detached, with no extra forward;
    otherwise one no-grad forward per mini-batch (one micro-batch each here) before the first step."""
    tcfg = TrainerConfig(lr=LR, warmup_ratio=0.0, micro_batch_size=2, share_prompt=False, ppo_epochs=ppo_epochs)
    model = fresh()
    grad_enabled = []
    model.get_decoder().register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    samples = [s for mb in two_mini_batches()[:mini_batches] for s in mb]
    policy_update(TorchBackend(model, tcfg, total_steps=10), samples, tcfg, TEMPERATURE, 0, mini_batches=mini_batches)
    assert grad_enabled.count(False) == no_grad_forwards and grad_enabled.count(True) == grad_forwards


class TwoEqualRanks(TorchBackend):
    """Rank 0 of two data-parallel ranks that hold the same samples: a sum over ranks is twice this rank's, and
    the average of the two ranks' equal gradients (what data-parallel backends do) is this rank's."""
    world_size = 2

    def all_reduce_sum(self, values):
        return [2 * v for v in values]


def test_two_ranks_give_the_gradient_of_the_global_token_mean(fresh):
    """Each rank's micro-batch loss is weighted by its share of both ranks' tokens, times the world size that
    the ranks' averaging divides by: the gradient is that of the token mean over all samples, as on one rank."""
    tcfg = TrainerConfig(lr=LR, warmup_ratio=0.0, micro_batch_size=1)
    x, y = two_mini_batches()[0]
    out = policy_update(TwoEqualRanks(fresh(), tcfg, total_steps=10), [x, y], tcfg, TEMPERATURE, 0)

    model = fresh()
    logp = torch.cat(response_logprobs(model, [x, y]))
    adv = torch.tensor(x.advantages + y.advantages)
    (-(adv * logp).mean()).backward()  # on-policy r = 1: the gradient of -r A is -A grad log p
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None)).item()
    assert out["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert out["loss"] == pytest.approx(1 / 3, abs=1e-6)  # -(1 + 1 - 1 - 1 - 1 - 1) / 6 at r = 1


def test_a_mini_batch_of_only_padding_reports_ratio_one_and_no_gradient(fresh):
    tcfg = TrainerConfig(lr=LR, warmup_ratio=0.0, micro_batch_size=2)
    out = policy_update(TorchBackend(fresh(), tcfg, total_steps=10), pad_samples(two_mini_batches()[0], 4), tcfg,
                        TEMPERATURE, 0, mini_batches=2)
    fillers = out["inner"][1]
    assert fillers["ratio_max"] == fillers["ratio_min"] == 1.0
    assert fillers["grad_norm"] == 0.0 and fillers["loss"] == 0.0
    assert out["ratio_max"] == pytest.approx(1.0, abs=1e-6) and out["ratio_min"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("mini_batches", [0, 3])
def test_mini_batches_must_split_this_ranks_samples_evenly(fresh, mini_batches):
    tcfg = TrainerConfig(micro_batch_size=2)
    samples = [s for mb in two_mini_batches() for s in mb]
    message = (f"4 samples on this rank cannot split into {mini_batches} equal mini-batches; make prompts per rank x "
               f"rollout.n_train a multiple of the mini-batches per step")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        policy_update(TorchBackend(fresh(), tcfg, total_steps=10), samples, tcfg, TEMPERATURE, 0,
                      mini_batches=mini_batches)


def test_progress_bars_only_when_asked(fresh, capsys):
    """Quiet by default (the run's own log stays readable); progress=True shows the mini- and micro-batch bars."""
    tcfg = TrainerConfig(lr=LR, warmup_ratio=0.0, micro_batch_size=1)
    samples = [s for mb in two_mini_batches() for s in mb]
    policy_update(TorchBackend(fresh(), tcfg, total_steps=10), samples, tcfg, TEMPERATURE, 0, mini_batches=2)
    assert capsys.readouterr().out == ""
    policy_update(TorchBackend(fresh(), tcfg, total_steps=10), samples, tcfg, TEMPERATURE, 0, mini_batches=2,
                  progress=True)
    shown = capsys.readouterr().out
    assert "update" in shown and "micro-batches" in shown


def test_checkpointing_is_seen_only_when_enabled(fresh, model_dir):
    """With activation checkpointing on, the update runs padded batches (no shared-prompt KV cache)."""
    assert not _checkpointing(fresh())
    assert _checkpointing(load_policy(model_dir, "float32", gradient_checkpointing=True)[0])


@pytest.mark.parametrize("share_prompt", [False, True], ids=["padded-batch", "shared-prompt"])
def test_temperature_aggregation_and_summary_reach_the_metrics(fresh, share_prompt):
    """At T = 0.7 with seq-mean-token-mean over micro-batches of two responses of unequal length: the first
    mini-batch is on-policy (r = 1), so its loss is the mean over responses of -A (X: -1, Y: +1, so 0; the token
    mean would be 1/3) and its policy entropy the token mean of the policy's entropies at T = 0.7; the summary
    averages the optimizer steps."""
    temperature = 0.7
    tcfg = TrainerConfig(lr=LR, warmup_ratio=0.0, micro_batch_size=2, share_prompt=share_prompt,
                         loss_agg="seq-mean-token-mean", prompts_per_step=2, mini_batch_prompts=1)
    mbs = two_mini_batches()
    out = policy_update(TorchBackend(fresh(), tcfg, total_steps=10), [s for mb in mbs for s in mb], tcfg,
                        temperature, 0, mini_batches=2)
    first, second = out["inner"]
    assert first["loss"] == pytest.approx(0.0, abs=1e-6)
    batch = pad_batch([s.prompt_ids for s in mbs[0]], [s.response_ids for s in mbs[0]], 0, "cpu")
    entropies = response_stats(fresh(), batch, temperature)[1]
    assert first["policy_entropy"] == pytest.approx(entropies.mean().item(), rel=1e-5)
    assert abs(entropies.mean().item() - response_stats(fresh(), batch, 1.0)[1].mean().item()) > 1e-2
    for key in ("loss", "policy_entropy", "ratio_mean"):
        assert out[key] == pytest.approx((first[key] + second[key]) / 2, rel=1e-6), key
    assert out["lr"] == LR and out["optimizer_steps"] == 2


def test_dual_clip_reaches_the_loss(fresh):
    """Mini-batch 2 after step 1: Z's tokens (A < 0) with max(r, clip(r)) above clip_ratio_c take the dual clip's
    bound; step 1 is on-policy (r = 1 < c), so the reference's ratios hold."""
    c = 1.02
    tcfg = TrainerConfig(lr=LR, warmup_ratio=0.0, grad_clip=1.0, micro_batch_size=2, share_prompt=False,
                         prompts_per_step=2, mini_batch_prompts=1, eps_low=EPS, eps_high=EPS, clip_ratio_c=c)
    mbs = two_mini_batches()
    out = policy_update(TorchBackend(fresh(), tcfg, total_steps=10), [s for mb in mbs for s in mb], tcfg,
                        TEMPERATURE, 0, mini_batches=2)
    z_ratio = reference_update(fresh(), mbs, tcfg)[1][1][1]
    dual = int((torch.maximum(z_ratio, z_ratio.clamp(1 - EPS, 1 + EPS)) > c).sum())
    assert 0 < dual, f"the test needs a Z token above the bound, got ratios {z_ratio}"
    assert out["inner"][0]["clip_frac_dual"] == 0.0
    assert out["inner"][1]["clip_frac_dual"] == pytest.approx(dual / 5)  # of the mini-batch's 5 tokens


def test_responses_of_one_prompt_share_its_forward(fresh):
    """X and Y have one prompt: one forward of the prompt (less its last token) and one of both responses."""
    tcfg = TrainerConfig(lr=LR, warmup_ratio=0.0, micro_batch_size=2, share_prompt=True)
    model = fresh()
    shapes = []
    model.get_decoder().register_forward_hook(lambda module, args, kwargs, out: shapes.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    x, y = two_mini_batches()[0]
    policy_update(TorchBackend(model, tcfg, total_steps=10), [x, y], tcfg, TEMPERATURE, 0)
    assert shapes == [(1, len(x.prompt_ids) - 1), (2, 1 + len(y.response_ids) - 1)]
