"""compute_advantages over several prompts at once: each group normalised and reshaped on its own, by hand.

Two groups (ids "a" and "b", interleaved so that grouping by position would be wrong):

    response  group  reward  H
    0         a      1       0.5
    1         b      0       1.0
    2         a      0       1.5
    3         b      1       3.0
    4         a      0       1.0
    5         b      1       2.0

Group a: rewards [1, 0, 0], mean 1/3, population std sqrt(2)/3 -> A = [sqrt 2, -1/sqrt 2, -1/sqrt 2];
Hbar = 1.0 -> Y = 1 + (1 - H) / 1 = [1.5, 0.5, 1.0].
Group b: rewards [0, 1, 1] -> A = [-sqrt 2, 1/sqrt 2, 1/sqrt 2]; Hbar = 2.0 -> Y = [1.5, 0.5, 1.0].
"""
import math

import pytest
import torch

from ettrl.advantages import AdvantageConfig, compute_advantages, grpo_advantages

GROUPS = ["a", "b", "a", "b", "a", "b"]
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
H = [0.5, 1.0, 1.5, 3.0, 1.0, 2.0]
S = math.sqrt(2)
GRPO = [S, -S, -1 / S, 1 / S, -1 / S, 1 / S]
Y = [1.5, 1.5, 0.5, 0.5, 1.0, 1.0]


def close(got, want):
    assert got.tolist() == pytest.approx(want, abs=1e-5)


def test_grpo_per_group():
    close(compute_advantages(REWARDS, groups=GROUPS), GRPO)
    close(grpo_advantages(REWARDS, groups=GROUPS), GRPO)
    # one group over all six: mean 1/2, std 1/2 -> +-1
    close(compute_advantages(REWARDS), [1.0, -1.0, -1.0, 1.0, -1.0, 1.0])


def test_group_size_groups_consecutive_responses():
    # [1, 0 | 0, 1 | 0, 1]: every pair is +-1
    close(compute_advantages(REWARDS, group_size=2), [1.0, -1.0, -1.0, 1.0, -1.0, 1.0])
    # [1, 0, 0 | 1, 0, 1]
    close(compute_advantages(REWARDS, group_size=3), [S, -1 / S, -1 / S, 1 / S, -S, 1 / S])


def test_bessel_std_per_group():
    # n - 1 = 2: std of [1, 0, 0] is sqrt(1/3) -> A = [2/3, -1/3, -1/3] * sqrt 3
    r3 = math.sqrt(3)
    want = [2 / 3 * r3, -2 / 3 * r3, -r3 / 3, r3 / 3, -r3 / 3, r3 / 3]
    close(compute_advantages(REWARDS, AdvantageConfig(std="bessel"), groups=GROUPS), want)


@pytest.mark.parametrize("alpha,beta", [(0.3, 0.1), (0.6, 0.4)])
def test_adv_res_uses_each_groups_mean_entropy_and_both_bounds(alpha, beta):
    cfg = AdvantageConfig(shaping="res", res_alpha=alpha, res_beta=beta)
    got = compute_advantages(REWARDS, cfg, groups=GROUPS, response_entropies=H)
    y = [min(max(v, 1 - alpha), 1 + beta) for v in Y]  # (0.3, 0.1): [1.1, 1.1, 0.7, 0.7, 1, 1]
    close(got, [a * yi for a, yi in zip(GRPO, y)])


def test_adv_res_prose_direction_per_group():
    cfg = AdvantageConfig(shaping="res", res_alpha=0.3, res_beta=0.1, res_direction="prose")
    got = compute_advantages(REWARDS, cfg, groups=GROUPS, response_entropies=H)
    # prose: Y = 1 + (H - Hbar) / Hbar = [0.5, 0.5, 1.5, 1.5, 1, 1] -> clip [0.7, 1.1]
    close(got, [a * yi for a, yi in zip(GRPO, [0.7, 0.7, 1.1, 1.1, 1.0, 1.0])])


def test_adv_clip_per_group():
    close(compute_advantages(REWARDS, AdvantageConfig(shaping="clip", clip_beta=1.0), groups=GROUPS),
          [1.0, -1.0, -1 / S, 1 / S, -1 / S, 1 / S])


def test_entropy_term_per_group_and_token():
    tokens = torch.tensor([[0.5, 4.0]] * 6)
    cfg = AdvantageConfig(entropy_alpha=0.4, entropy_kappa=2.0)
    got = compute_advantages(REWARDS, cfg, groups=GROUPS, token_entropies=tokens)
    want = [[a + min(0.4 * h, abs(a) / 2) for h in (0.5, 4.0)] for a in GRPO]
    assert got.shape == (6, 2)
    for row, w in zip(got.tolist(), want):
        assert row == pytest.approx(w, abs=1e-5)


def test_groups_as_tensor_or_names_give_the_same_advantages():
    by_names = compute_advantages(REWARDS, groups=GROUPS)
    by_tensor = compute_advantages(REWARDS, groups=torch.tensor([7, 3, 7, 3, 7, 3]))
    assert torch.equal(by_names, by_tensor)


def test_adv_res_with_group_size_uses_each_groups_mean():
    # consecutive groups of 3: [1, 0, 0 | 1, 0, 1], H [0.5, 1.0, 1.5 | 3.0, 1.0, 2.0] -> Hbar 1.0 and 2.0
    cfg = AdvantageConfig(shaping="res", res_alpha=0.3, res_beta=0.1)
    got = compute_advantages(REWARDS, cfg, group_size=3, response_entropies=H)
    y = [1.1, 1.0, 0.7, 0.7, 1.1, 1.0]  # 1 + (Hbar - H) / Hbar = [1.5, 1, 0.5 | 0.5, 1.5, 1], clipped to [0.7, 1.1]
    close(got, [a * yi for a, yi in zip([S, -1 / S, -1 / S, 1 / S, -S, 1 / S], y)])


def test_adv_clip_default_bound_and_messages():
    from ettrl.advantages import adv_clip
    close(adv_clip([5.0, -5.0, 1.5]), [2.0, -2.0, 1.5])
    with pytest.raises(ValueError, match="^advantages must be one value per response"):
        adv_clip([[1.0]])
    with pytest.raises(ValueError, match="^shaping 'res' needs response_entropies"):
        compute_advantages(REWARDS, AdvantageConfig(shaping="res"))
    with pytest.raises(ValueError, match="^std must be one of"):
        AdvantageConfig(std="sample")


def test_entropy_term_defaults_dtype_and_checks():
    from ettrl.advantages import entropy_term
    # defaults alpha 0.4, kappa 2: A + min(0.4 H, |A| / 2)
    got = entropy_term(torch.tensor([1.0, -1.0]), torch.tensor([[0.5, 2.0], [0.5, 2.0]]))
    assert got.flatten().tolist() == pytest.approx([1.2, 1.5, -0.8, -0.5])
    doubles = entropy_term(torch.tensor([1.0], dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64))
    assert doubles.dtype == torch.float32
    with pytest.raises(ValueError, match="need advantages"):
        entropy_term([1.0], [0.5])  # token entropies must be [N, T]
    with pytest.raises(ValueError, match=r"^entropy_alpha > 0 needs token_entropies \[N, T\]"):
        compute_advantages(REWARDS, AdvantageConfig(entropy_alpha=0.4))
    cfg = AdvantageConfig(entropy_alpha=0.4, entropy_kappa=4.0)
    got = compute_advantages([1.0, 0.0], cfg, token_entropies=torch.tensor([[2.0], [2.0]]))
    assert got.flatten().tolist() == pytest.approx([1.25, -0.75], abs=1e-5)  # |A| / 4 = 0.25 caps 0.8
