"""Advantages: hand-computed values and properties (zero mean per group, Adv-Res sign and scale bounds)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ettrl.advantages import AdvantageConfig, adv_clip, adv_res, compute_advantages, entropy_term, grpo_advantages

advantage_values = st.floats(-3, 3).filter(lambda x: x == 0 or abs(x) > 1e-6)  # no float32 subnormals
rewards_lists = st.lists(st.sampled_from([0.0, 1.0, 0.25, -1.0, 2.5]), min_size=1, max_size=12)


def test_grpo_hand_computed():
    # mean 0.5, population std 0.5
    a = grpo_advantages([1.0, 0.0, 0.0, 1.0])
    assert torch.allclose(a, torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (0.5 + 1e-6))
    # groups of 3: [1, 0, 0] -> mean 1/3, std sqrt(2)/3; [1, 1, 1] -> zero
    a = grpo_advantages([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], group_size=3)
    std = 2 ** 0.5 / 3
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]) / (std + 1e-6)
    assert torch.allclose(a, expected)


def test_grpo_group_ids_equal_group_size():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0])
    by_size = grpo_advantages(rewards, group_size=2)
    by_ids = grpo_advantages(rewards, groups=[7, 7, 3, 3, 9, 9])
    shuffled = grpo_advantages(rewards[[0, 2, 1, 3, 4, 5]], groups=[7, 3, 7, 3, 9, 9])
    by_names = grpo_advantages(rewards, groups=["q7", "q7", "q3", "q3", "q9", "q9"])
    by_tensor = grpo_advantages(rewards, groups=torch.tensor([7, 7, 3, 3, 9, 9]))
    assert torch.equal(by_size, by_ids) and torch.equal(by_size, by_names) and torch.equal(by_size, by_tensor)
    assert torch.allclose(shuffled, by_size[[0, 2, 1, 3, 4, 5]])


@settings(max_examples=200, deadline=None)
@given(st.lists(rewards_lists, min_size=1, max_size=5))
def test_grpo_zero_mean_unit_std_per_group(groups):
    rewards = [r for g in groups for r in g]
    ids = [i for i, g in enumerate(groups) for _ in g]
    a = grpo_advantages(rewards, groups=ids)
    for i, g in enumerate(groups):
        part = a[torch.tensor(ids) == i]
        assert abs(part.mean().item()) < 1e-5
        if len(set(g)) == 1:
            assert torch.equal(part, torch.zeros(len(g)))  # all-equal rewards: exactly zero
        else:
            assert part.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_grpo_errors():
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages([1.0, 0.0], group_size=3)
    with pytest.raises(ValueError, match="either group_size or groups"):
        grpo_advantages([1.0, 0.0], group_size=2, groups=[0, 0])
    with pytest.raises(ValueError, match="one id per response"):
        grpo_advantages([1.0, 0.0], groups=[0])
    with pytest.raises(ValueError, match="1-D"):
        grpo_advantages([[1.0, 0.0]])


def test_adv_res_hand_computed():
    a = torch.tensor([1.5, -0.5, -1.0, 2.0])
    # group mean entropy 2: Y = 1 + (2 - H) / 2 = [1.5, 1.0, 0.5, 1.0] -> clip [0.8, 1.2] = [1.2, 1.0, 0.8, 1.0]
    out = adv_res(a, [1.0, 2.0, 3.0, 2.0])
    assert torch.allclose(out, torch.tensor([1.8, -0.5, -0.8, 2.0]))
    # wider clip range keeps Y itself; more uncertain than the group -> smaller |A| (the equations' direction)
    out = adv_res(a, [1.0, 2.0, 3.0, 2.0], alpha=0.9, beta=0.9)
    assert torch.allclose(out, a * torch.tensor([1.5, 1.0, 0.5, 1.0]))


def test_adv_res_prose_direction_hand_computed():
    a = torch.tensor([1.5, -0.5, -1.0, 2.0])
    # Y = 1 + (H - 2) / 2 = [0.5, 1.0, 1.5, 1.0] -> clip [0.8, 1.2]: more uncertain than the group -> larger |A|
    out = adv_res(a, [1.0, 2.0, 3.0, 2.0], direction="prose")
    assert torch.allclose(out, torch.tensor([1.2, -0.5, -1.2, 2.0]))
    config = AdvantageConfig(shaping="res", res_direction="prose")
    assert torch.allclose(compute_advantages([1.0, 0.0], config, response_entropies=[1.0, 3.0]),
                          torch.tensor([0.8, -1.2]), atol=1e-5)
    with pytest.raises(ValueError, match="res_direction"):
        AdvantageConfig(res_direction="sideways")


def test_adv_res_per_group_mean_and_zero_entropy_group():
    a = torch.tensor([1.0, -1.0, 1.0, -1.0])
    out = adv_res(a, [1.0, 3.0, 0.0, 0.0], group_size=2)  # group 1: mean 2 -> Y = [1.5, 0.5]; group 2: mean 0
    assert torch.allclose(out, torch.tensor([1.2, -0.8, 1.0, -1.0]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(advantage_values, st.floats(0, 5)), min_size=1, max_size=16),
       st.floats(0, 0.9), st.floats(0, 2))
def test_adv_res_keeps_sign_and_scales_within_bounds(pairs, alpha, beta):
    a = torch.tensor([p[0] for p in pairs])
    h = torch.tensor([p[1] for p in pairs])
    out = adv_res(a, h, alpha=alpha, beta=beta)
    assert torch.all(torch.sign(out) == torch.sign(a))
    nonzero = a != 0
    scale = out[nonzero] / a[nonzero]
    assert torch.all(scale >= 1 - alpha - 1e-5) and torch.all(scale <= 1 + beta + 1e-5)


def test_adv_clip():
    out = adv_clip(torch.tensor([-3.0, -1.0, 0.0, 2.5]), beta=2.0)
    assert torch.equal(out, torch.tensor([-2.0, -1.0, 0.0, 2.0]))


def test_entropy_term_hand_computed():
    a = torch.tensor([1.0, -1.0, 0.0])
    h = torch.tensor([[0.5, 5.0], [0.5, 5.0], [1.0, 1.0]])
    out = entropy_term(a, h, alpha=0.4, kappa=2.0)
    # bonus min(0.4 H, |A| / 2): [0.2, 0.5], [0.2, 0.5], [0, 0]
    assert torch.allclose(out, torch.tensor([[1.2, 1.5], [-0.8, -0.5], [0.0, 0.0]]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(advantage_values, st.floats(0, 10)), min_size=1, max_size=16), st.floats(1, 5))
def test_entropy_term_never_flips_sign_and_is_bounded(pairs, kappa):
    a = torch.tensor([p[0] for p in pairs])
    h = torch.tensor([[p[1], p[1] / 2] for p in pairs])
    out = entropy_term(a, h, alpha=0.4, kappa=kappa)
    bonus = out - a[:, None]
    assert torch.all(bonus >= 0) and torch.all(bonus <= a.abs()[:, None] / kappa + 1e-6)
    assert torch.all((out * a[:, None]) >= 0)


def test_entropy_term_is_detached_and_validates():
    h = torch.rand(2, 3, requires_grad=True)
    out = entropy_term(torch.tensor([1.0, -1.0]), h)
    assert not out.requires_grad
    per_token = entropy_term(torch.ones(2, 3), h.detach())
    assert per_token.shape == (2, 3)
    with pytest.raises(ValueError, match="kappa"):
        entropy_term(torch.ones(2), h, kappa=0.5)
    with pytest.raises(ValueError, match="token_entropies"):
        entropy_term(torch.ones(3), h)


def test_compute_advantages_combinations():
    rewards = [1.0, 0.0, 1.0, 0.0]
    h = [0.5, 1.0, 1.5, 1.0]
    base = grpo_advantages(rewards)
    assert torch.equal(compute_advantages(rewards), base)
    ettrl = compute_advantages(rewards, AdvantageConfig(shaping="res"), response_entropies=h)
    assert torch.allclose(ettrl, adv_res(base, h))
    assert torch.equal(compute_advantages([5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                                          AdvantageConfig(shaping="clip")).max(), torch.tensor(2.0))
    tokens = torch.rand(4, 5)
    with_term = compute_advantages(rewards, AdvantageConfig(shaping="res", entropy_alpha=0.4),
                                   response_entropies=h, token_entropies=tokens)
    assert torch.allclose(with_term, entropy_term(adv_res(base, h), tokens, 0.4, 2.0))
    with pytest.raises(ValueError, match="response_entropies"):
        compute_advantages(rewards, AdvantageConfig(shaping="res"))
    with pytest.raises(ValueError, match="token_entropies"):
        compute_advantages(rewards, AdvantageConfig(entropy_alpha=0.4))
    with pytest.raises(ValueError, match="shaping"):
        AdvantageConfig(shaping="ppo")


def test_error_messages_name_the_argument_to_fix():
    with pytest.raises(ValueError, match=r"^rewards must be one value per response \(1-D\), got shape \(1, 2\)$"):
        grpo_advantages([[1.0, 0.0]])
    with pytest.raises(ValueError, match=r"^std must be one of \('population', 'bessel'\), got 'n'$"):
        grpo_advantages([1.0, 0.0], std="n")
    with pytest.raises(ValueError, match=r"^pass either group_size or groups, not both$"):
        grpo_advantages([1.0, 0.0], group_size=2, groups=[0, 0])
    with pytest.raises(ValueError, match=r"^advantages must be one value per response \(1-D\)"):
        adv_res([[1.0]], [1.0])
    with pytest.raises(ValueError, match=r"^response_entropies must be one value per response \(1-D\)"):
        adv_res([1.0], [[1.0]])
    with pytest.raises(ValueError, match=r"^2 advantages but 3 response entropies$"):
        adv_res([1.0, 0.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"^direction must be one of \('equations', 'prose'\), got 'up'$"):
        adv_res([1.0], [1.0], direction="up")


def test_group_sizes_zero_and_one():
    with pytest.raises(ValueError, match="^2 responses cannot be split into groups of 0$"):
        grpo_advantages([1.0, 0.0], group_size=0)
    assert grpo_advantages([1.0, 0.0], group_size=1).tolist() == [0.0, 0.0]  # each response its own group
    assert grpo_advantages([]).shape == (0,)


def test_eps_is_added_to_the_std():
    # rewards 2e-6 apart: centred +-1e-6, population std 1e-6 -> A = +-1e-6 / 2e-6; Bessel std sqrt(2) 1e-6
    assert grpo_advantages([0.0, 2e-6]).tolist() == pytest.approx([-0.5, 0.5], rel=1e-3)
    bessel = 1 / (2 ** 0.5 + 1)
    assert grpo_advantages([0.0, 2e-6], std="bessel").tolist() == pytest.approx([-bessel, bessel], rel=1e-3)


def test_bessel_std_of_a_group_of_two():
    # mean 1/2, squares 1/4 + 1/4 over n - 1 = 1: sd = 1/sqrt 2, A = +-1/sqrt 2
    assert grpo_advantages([1.0, 0.0], std="bessel").tolist() == pytest.approx([0.5 ** 0.5, -0.5 ** 0.5], rel=1e-5)


@pytest.mark.parametrize("direction,y", [("equations", [1.2, 0.8]), ("prose", [0.8, 1.2])])
def test_adv_res_divides_by_a_group_mean_entropy_below_one(direction, y):
    # Hbar = 0.5: Y = 1 -+ 0.1 / 0.5 (a division by Hbar, not by 1 or a product with it)
    out = adv_res([1.0, -1.0], [0.4, 0.6], alpha=0.5, beta=0.5, direction=direction)
    assert out.tolist() == pytest.approx([y[0], -y[1]], rel=1e-5)


def test_outputs_are_float32_whatever_the_input_and_the_global_default_dtype():
    import numpy as np
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for rewards in ([1.0, 0.0, 0.0], np.array([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0])):
            assert grpo_advantages(rewards).dtype == torch.float32
            assert grpo_advantages(rewards, groups=["a", "b", "a"]).dtype == torch.float32
            assert adv_res(rewards, np.array([1.0, 2.0, 3.0])).dtype == torch.float32
    finally:
        torch.set_default_dtype(previous)
