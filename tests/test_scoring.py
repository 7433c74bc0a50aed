"""ettrl.scoring: from one prompt's rollouts to training samples, against values worked out by hand.

The group below has six responses; three of them train (vote_then_sample(6, 3, seed=6) = [0, 3, 4], a set
whose positions differ from 0, 1, 2, so a reward or entropy taken by position instead of by response shows):

    i  answer  finish  token entropies   H_i (mean)
    0  4       stop    0.2 0.4           0.3
    1  5       stop    1.0               1.0
    2  4       stop    0.5 0.5 0.5       0.5
    3  7       length  2.0 2.0           2.0    truncated: no answer, never votes (its box is complete)
    4  7       stop    1.5               1.5
    5  7       length  0.9 1.1           1.0    truncated

Votes: "4" twice, "5" once, "7" once (truncated responses do not vote), so the label is "4"; with the
truncated responses voting, "7" would win 3 to 2.
"""
import math

import pytest
import torch

from ettrl.config import Config
from ettrl.data import Problem
from ettrl.rewards import vote_then_sample
from ettrl.samples import Group, Response
from ettrl.scoring import score_group

SEED = 6
KEEP = [0, 3, 4]
H = [0.3, 1.0, 0.5, 2.0, 1.5, 1.0]
TOKEN_H = [[0.2, 0.4], [1.0], [0.5, 0.5, 0.5], [2.0, 2.0], [1.5], [0.9, 1.1]]


def group(answer: str | None = "4") -> Group:
    boxes = ["4", "5", "4", "7", "7", "7"]
    finish = ["stop", "stop", "stop", "length", "stop", "length"]
    responses = [Response(token_ids=[100 + i] * len(h), text=f"so it is \\boxed{{{b}}}", entropies=h,
                          finish_reason=f) for i, (b, h, f) in enumerate(zip(boxes, TOKEN_H, finish))]
    return Group(problem=Problem("What is 2 + 2?", answer), prompt_ids=[1, 2, 3], responses=responses,
                 decoded_tokens=11)


def config(method: str, **algo) -> Config:
    cfg = Config(method=method)
    cfg.rollout.n_train = 3
    if hasattr(cfg.rollout, "train_pick"):
        cfg.rollout.train_pick = "random"
    for key, value in algo.items():
        setattr(cfg.algo, key, value)
    return cfg


def trained(samples) -> dict[int, list[float]]:
    """Response index -> its per-token advantages, found by the response's own token ids."""
    out = {}
    for s in samples:
        if getattr(s, "padding", False):  # a zero-weight filler up to n_train (moves no gradient)
            assert set(s.advantages) <= {0.0}
            continue
        i = s.response_ids[0] - 100
        assert s.response_ids == [100 + i] * len(TOKEN_H[i]) and s.prompt_ids == [1, 2, 3]
        assert len(s.advantages) == len(s.response_ids)
        out[i] = s.advantages
    return out


def grpo(rewards: list[float]) -> list[float]:
    """(R - mean) / population std, written out (eps 1e-6 is below the tolerance)."""
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    return [(r - mean) / (std + 1e-6) for r in rewards]


def adv_res(adv: list[float], h: list[float], alpha: float, beta: float) -> list[float]:
    """EAR Adv-Res (equations direction): A * clip(1 + (Hbar - H) / Hbar, 1 - alpha, 1 + beta)."""
    h_bar = sum(h) / len(h)
    return [a * min(max(1 + (h_bar - hi) / h_bar, 1 - alpha), 1 + beta) for a, hi in zip(adv, h)]


def assert_advantages(samples, expected: dict[int, float | list[float]]):
    got = trained(samples)
    assert sorted(got) == sorted(expected)
    for i, want in expected.items():
        want = [want] * len(TOKEN_H[i]) if isinstance(want, float) else want
        assert got[i] == pytest.approx(want, abs=1e-5), f"response {i}"


def test_the_fixture_keeps_responses_0_3_4():
    assert vote_then_sample(6, 3, SEED) == KEEP


def test_truncated_responses_never_vote_and_rewards_follow_their_response():
    samples, metrics = score_group(group(), config("ttrl"), SEED)
    # rewards: [1, 0, 1, 0, 0, 0] (label "4"); kept [0, 3, 4] -> [1, 0, 0]: A = [sqrt 2, -1/sqrt 2, -1/sqrt 2]
    assert_advantages(samples, {0: math.sqrt(2), 3: -1 / math.sqrt(2), 4: -1 / math.sqrt(2)})
    assert metrics["majority_ratio"] == pytest.approx(2 / 6)
    assert metrics["reward"] == pytest.approx(2 / 6)
    assert metrics["answered"] == pytest.approx(4 / 6)
    assert metrics["truncated"] == pytest.approx(2 / 6)
    assert metrics["entropy"] == pytest.approx(sum(H) / 6)
    assert metrics["response_len"] == pytest.approx(11 / 6)
    assert metrics["label_acc"] == 1.0
    assert metrics["rollout_acc"] == pytest.approx(2 / 6)  # responses 0 and 2; the truncated boxes count as wrong
    assert metrics["reward_acc"] == 1.0


def test_label_accuracy_against_a_wrong_ground_truth():
    _, metrics = score_group(group(answer="7"), config("ttrl"), SEED)
    assert metrics["label_acc"] == 0.0
    assert metrics["rollout_acc"] == pytest.approx(1 / 6)  # only response 4 answered 7 in a finished response
    assert metrics["reward_acc"] == pytest.approx(3 / 6)  # 1, 3 and 5 get 0 and deserve 0


def test_last_number_fallback_still_keeps_truncated_responses_out():
    g = group()
    for r in g.responses:
        r.text = r.text.replace("\\boxed{", "").replace("}", "")
    cfg = config("ttrl")
    _, off = score_group(g, cfg, SEED)
    assert off["answered"] == 0.0 and off["majority_ratio"] == 0.0
    cfg.rollout.last_number_fallback = True
    samples, on = score_group(g, cfg, SEED)
    assert on["answered"] == pytest.approx(4 / 6) and on["majority_ratio"] == pytest.approx(2 / 6)
    assert_advantages(samples, {0: math.sqrt(2), 3: -1 / math.sqrt(2), 4: -1 / math.sqrt(2)})


def _majority_grpo():
    return dict(zip(KEEP, grpo([1.0, 0.0, 0.0])))


def _majority_res(alpha, beta):
    return dict(zip(KEEP, adv_res(grpo([1.0, 0.0, 0.0]), [H[i] for i in KEEP], alpha, beta)))


def _rent(beta):
    return dict(zip(KEEP, grpo([-beta * H[i] for i in KEEP])))


def _dare(tau: float = 0.05):
    # classes over the finished answers: "4" n=2 u=0.4, "5" n=1 u=1.0, "7" n=1 u=1.5
    # p ~ n / u = 5, 1, 2/3 -> 0.75, 0.15, 0.10; tau 0.12 would prune "7" (renormalised 5/6, 1/6, 0)
    # bonus (1 - n/6)(1 - min(u, 1)) = 0.4, 0, 0; reward p + 0.5 b; None answers get 0
    if tau == 0.05:
        rewards = [0.75 + 0.2, 0.15, 0.75 + 0.2, 0.0, 0.1, 0.0]
    else:
        rewards = [5 / 6 + 0.2, 1 / 6, 5 / 6 + 0.2, 0.0, 0.0, 0.0]
    return dict(zip(KEEP, grpo([rewards[i] for i in KEEP])))


# every method of the table: its rewards and its advantage shaping, worked out by hand
ALPHA, BETA = 0.3, 0.1  # unequal, so that swapping the bounds shows
METHOD_ADVANTAGES = {
    "ttrl": _majority_grpo,
    "etmr": _majority_grpo,
    "ear": lambda: _majority_res(ALPHA, BETA),
    "ettrl": lambda: _majority_res(ALPHA, BETA),
    "rent": lambda: _rent(0.5),
    "dare": _dare,
}


def test_every_method_of_the_table_is_checked_here():
    from ettrl.methods import METHODS
    assert set(METHODS) == set(METHOD_ADVANTAGES)


@pytest.mark.parametrize("method", sorted(METHOD_ADVANTAGES))
def test_each_methods_rewards_and_shaping_reach_the_samples(method):
    cfg = config(method, res_alpha=ALPHA, res_beta=BETA, rent_beta=0.5, dare_alpha=0.5, dare_tau=0.05)
    samples, _ = score_group(group(), cfg, SEED)
    assert_advantages(samples, METHOD_ADVANTAGES[method]())


def test_dare_prunes_improbable_classes():
    samples, _ = score_group(group(), config("dare", dare_alpha=0.5, dare_tau=0.12), SEED)
    assert_advantages(samples, _dare(tau=0.12))


def test_rent_reward_is_minus_beta_times_the_response_entropy():
    # GRPO cancels a positive scale, so beta shows in the logged reward, not in the advantages
    _, metrics = score_group(group(), config("rent", rent_beta=0.5), SEED)
    assert metrics["reward"] == pytest.approx(-0.5 * sum(H) / 6)


def test_adv_res_prose_direction_reaches_the_samples():
    samples, _ = score_group(group(), config("ettrl", res_alpha=ALPHA, res_beta=BETA, res_direction="prose"), SEED)
    h = [H[i] for i in KEEP]
    h_bar = sum(h) / 3
    y = [min(max(1 + (hi - h_bar) / h_bar, 1 - ALPHA), 1 + BETA) for hi in h]  # [0.7, 1.1, 1.1]
    assert y == pytest.approx([0.7, 1.1, 1.1])
    assert_advantages(samples, {i: a * yi for i, a, yi in zip(KEEP, grpo([1.0, 0.0, 0.0]), y)})


def test_hand_values_of_adv_res_with_unequal_bounds():
    # kept H = [0.3, 2.0, 1.5], Hbar = 3.8 / 3; Y = [1.763, 0.421, 0.816] -> clip [0.7, 1.1] = [1.1, 0.7, 0.816]
    got = _majority_res(ALPHA, BETA)
    y = [1.1, 0.7, 1 - (1.5 - 3.8 / 3) / (3.8 / 3)]
    assert [got[i] for i in KEEP] == pytest.approx([a * yi for a, yi in zip(grpo([1.0, 0.0, 0.0]), y)])


def test_reshape_override_clip_and_none():
    cfg = config("ettrl", reshape="clip", clip_beta=1.0)
    samples, _ = score_group(group(), cfg, SEED)
    assert_advantages(samples, {0: 1.0, 3: -1 / math.sqrt(2), 4: -1 / math.sqrt(2)})  # sqrt 2 clipped to 1
    samples, _ = score_group(group(), config("ear", reshape="none"), SEED)
    assert_advantages(samples, _majority_grpo())


def test_entropy_term_uses_each_responses_own_token_entropies():
    cfg = config("ttrl", entropy_adv=True, entropy_alpha=0.4, entropy_kappa=3.0)
    samples, _ = score_group(group(), cfg, SEED)
    base = _majority_grpo()
    # A'_t = A + min(alpha H_t, |A| / kappa); response 3's tokens (H 2.0) hit the cap |A| / 3
    expected = {i: [base[i] + min(0.4 * h, abs(base[i]) / 3.0) for h in TOKEN_H[i]] for i in KEEP}
    assert expected[3] == pytest.approx([-1 / math.sqrt(2) * (1 - 1 / 3)] * 2, abs=1e-5)
    assert expected[0] == pytest.approx([math.sqrt(2) + 0.08, math.sqrt(2) + 0.16], abs=1e-5)
    assert_advantages(samples, expected)


def test_all_responses_train_when_n_train_covers_them():
    cfg = config("ttrl")
    cfg.rollout.n_train = 10  # more than the group: every response trains once (fillers may pad to 10)
    samples, _ = score_group(group(), cfg, SEED)
    assert_advantages(samples, dict(enumerate(grpo([1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))))


def test_a_group_where_nobody_answers_trains_with_zero_advantages():
    g = group()
    for r in g.responses:
        r.finish_reason = "length"
    samples, metrics = score_group(g, config("ttrl"), SEED)
    assert metrics["answered"] == 0.0 and metrics["reward"] == 0.0 and metrics["label_acc"] == 0.0
    assert_advantages(samples, {i: 0.0 for i in KEEP})


def test_answers_of_has_no_last_number_fallback_by_default():
    from ettrl.scoring import answers_of
    g = group()
    g.responses[0].text = "it is 4"
    assert answers_of(g) == [None, "5", "4", None, "7", None]
    assert answers_of(g, last_number_fallback=True)[0] == "4"


def test_response_entropy_is_the_mean_of_its_tokens():
    r = Response([1, 2, 3], "", [0.5, 1.0, 3.0], "stop")
    assert r.entropy == pytest.approx(1.5)
    assert Response([], "", [], "length").entropy == 0.0


def test_advantages_are_float_lists_per_token():
    samples, _ = score_group(group(), config("ettrl", entropy_adv=True), SEED)
    for s in samples:
        assert all(isinstance(a, float) for a in s.advantages)
        assert torch.tensor(s.advantages).isfinite().all()


def test_train_pick_first_trains_the_first_n_train_votes():
    cfg = config("ttrl")
    cfg.rollout.train_pick = "first"  # TTRL: the first n_train of the votes
    samples, _ = score_group(group(), cfg, SEED)
    # kept rewards [1, 0, 1]: mean 2/3, std sqrt(2)/3 -> [1/sqrt 2, -sqrt 2, 1/sqrt 2]
    assert_advantages(samples, {0: 1 / math.sqrt(2), 1: -math.sqrt(2), 2: 1 / math.sqrt(2)})
    cfg.rollout.n_train = 10
    samples, _ = score_group(group(), cfg, SEED)
    assert_advantages(samples, dict(enumerate(grpo([1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))))


def test_bessel_std_reaches_the_samples():
    samples, _ = score_group(group(), config("ttrl", std="bessel"), SEED)
    # kept rewards [1, 0, 0]: mean 1/3, std with n - 1: sqrt((4/9 + 2/9) / 2) = 1/sqrt 3
    r3 = math.sqrt(3)
    assert_advantages(samples, {0: 2 / 3 * r3, 3: -r3 / 3, 4: -r3 / 3})


def test_ttrl_vote_lets_truncated_responses_vote():
    """rollout.vote=ttrl: every response votes with TTRL's answer string, so "7" (responses 3, 4, 5; two of them
    truncated) beats "4" 3 to 2. Rewards [0, 0, 0, 1, 1, 1]; kept [0, 3, 4] -> [0, 1, 1]."""
    from ettrl.scoring import answers_of

    cfg = config("ttrl")
    cfg.rollout.vote = "ttrl"
    assert answers_of(group(), vote="ttrl") == ["4", "5", "4", "7", "7", "7"]
    samples, metrics = score_group(group(), cfg, SEED)
    assert_advantages(samples, dict(zip(KEEP, grpo([0.0, 1.0, 1.0]))))
    assert metrics["majority_ratio"] == pytest.approx(3 / 6) and metrics["answered"] == 1.0
    assert metrics["label_acc"] == 0.0 and metrics["reward"] == pytest.approx(3 / 6)
    g = group()
    g.responses[1].text = "I could not finish"  # no box, no number: TTRL's "" votes but is no answer
    assert answers_of(g, vote="ttrl")[1] == ""
    assert score_group(g, cfg, SEED)[1]["answered"] == pytest.approx(5 / 6)


def test_ttrl_vote_counts_strings_not_values():
    """Responses "0.5", "\\frac{1}{2}", "\\frac{1}{2}", "3", "3", "3": the boxed vote makes {0.5, 1/2} the label
    (3 to 3, seen first); TTRL's string vote makes "3" the label (3 to 2)."""
    g = group(answer="3")
    for r, box in zip(g.responses, ["0.5", "\\frac{1}{2}", "\\frac{1}{2}", "3", "3", "3"]):
        r.text, r.finish_reason = f"so it is \\boxed{{{box}}}", "stop"
    cfg = config("ttrl")
    assert score_group(g, cfg, SEED)[1]["label_acc"] == 0.0
    cfg.rollout.vote = "ttrl"
    assert score_group(g, cfg, SEED)[1]["label_acc"] == 1.0


def test_train_pick_stratified_takes_every_tree():
    """Leaves of trees [0, 0, 0, 1, 1, 2] (ordered by root); three train: one from each tree. Tree 1's pick and
    tree 0's are seeded; tree 2 has only response 5."""
    g = group()
    for r, tree in zip(g.responses, [0, 0, 0, 1, 1, 2]):
        r.tree = tree
    cfg = config("etmr")
    cfg.rollout.train_pick = "stratified"
    for seed in range(8):
        picked = sorted(trained(score_group(g, cfg, seed)[0]))
        assert len(picked) == 3 and picked[0] in (0, 1, 2) and picked[1] in (3, 4) and picked[2] == 5
    g.responses[5].tree = 0  # trees [0, 0, 0, 1, 1, 0]: a round gives tree 0 one and tree 1 one, then tree 0 again
    for seed in range(8):
        picked = sorted(trained(score_group(g, cfg, seed)[0]))
        assert sum(i in (3, 4) for i in picked) == 1 and sum(i in (0, 1, 2, 5) for i in picked) == 2
    for r in g.responses:
        r.tree = None  # parallel samples: each its own tree, so the first n_train (TTRL's pick)
    assert sorted(trained(score_group(g, cfg, SEED)[0])) == [0, 1, 2]
