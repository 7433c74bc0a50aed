"""The methods table drives config validation, scoring and the rollout kind; scoring's TTRL options (Bessel's
std, the first n_train) and the zero-weight padding of short trees, on hand-built groups."""
import statistics

import pytest
import torch

from ettrl.advantages import grpo_advantages
from ettrl.config import ConfigError, load_config
from ettrl.data import Problem
from ettrl.methods import METHODS, Method, method_spec
from ettrl.rewards import REWARDS
from ettrl.samples import Group, Response
from ettrl.scoring import score_group


def group(answers: list[str], entropies: list[float] | None = None) -> Group:
    entropies = entropies or [0.1 * (i + 1) for i in range(len(answers))]
    responses = [Response([10 + i, 20 + i], f"so \\boxed{{{a}}}", [h, h], "stop")
                 for i, (a, h) in enumerate(zip(answers, entropies))]
    return Group(Problem("1 + 1?", "2"), [1, 2, 3], responses, decoded_tokens=2 * len(answers))


def test_table_names_every_method_and_config_reads_it():
    assert set(METHODS) == {"ttrl", "etmr", "ear", "ettrl", "rent", "dare"}
    for name, m in METHODS.items():
        cfg = load_config(None, [f"method={name}", "rollout.n_train=4"])
        assert cfg.tree == (m.rollout == "tree")
        assert cfg.shaping == m.shaping
    assert (method_spec("ettrl").rollout, method_spec("ettrl").shaping) == ("tree", "res")
    with pytest.raises(ValueError, match="choose one of ttrl"):
        method_spec("grpo")


def test_a_new_method_is_one_table_line(monkeypatch):
    monkeypatch.setitem(METHODS, "tree-rent", Method("tree-rent", "tree", "rent", "clip", "trees, entropy reward"))
    cfg = load_config(None, ["method=tree-rent", "rollout.n_train=4"])
    assert cfg.tree and cfg.shaping == "clip" and cfg.n_votes == cfg.rollout.trees * 5
    samples, metrics = score_group(group(["2", "2", "3", "2", "5"]), cfg, seed=0)
    assert metrics["reward"] == pytest.approx(-statistics.mean([0.1, 0.2, 0.3, 0.4, 0.5]))
    with pytest.raises(ConfigError, match="unknown"):
        load_config(None, ["method=tree-dare"])


def test_each_reward_comes_from_the_table():
    g = group(["2", "2", "3", "2", "5"])
    rewards = {}
    for name in METHODS:
        cfg = load_config(None, [f"method={name}", "rollout.n_train=5", "rollout.n_votes=5", "rollout.trees=1",
                                 "rollout.forks=2", "rollout.branches=2"])
        rewards[name] = score_group(g, cfg, 0)[1]["reward"]
    assert rewards["ttrl"] == rewards["etmr"] == rewards["ear"] == rewards["ettrl"] == pytest.approx(3 / 5)
    assert rewards["rent"] == pytest.approx(-0.3)
    assert rewards["dare"] != rewards["ttrl"]
    assert REWARDS.keys() == {"majority", "rent", "dare"}


def test_bessel_std_as_verl():
    r = [1.0, 0.0, 0.0, 1.0, 1.0]
    t = torch.tensor(r)
    expected = (t - t.mean()) / (t.std(unbiased=True) + 1e-6)  # verl: torch.std (Bessel)
    torch.testing.assert_close(grpo_advantages(r, std="bessel"), expected)
    torch.testing.assert_close(grpo_advantages(r), (t - t.mean()) / (t.std(unbiased=False) + 1e-6))
    assert grpo_advantages([1.0], std="bessel").tolist() == pytest.approx([1 / (1 + 1e-6)])  # verl: mean 0, std 1
    assert grpo_advantages([1.0, 1.0], std="bessel").tolist() == [0.0, 0.0]
    two_groups = grpo_advantages([1.0, 0.0, 0.0, 0.0, 1.0], groups=[0, 0, 1, 1, 1], std="bessel")
    torch.testing.assert_close(two_groups[:2], grpo_advantages([1.0, 0.0], std="bessel"))


def test_first_n_train_and_bessel_in_scoring():
    g = group(["2", "3", "2", "2", "7", "2"])
    cfg = load_config(None, ["rollout.n_train=4", "rollout.n_votes=6", "rollout.train_pick=first", "algo.std=bessel"])
    samples, _ = score_group(g, cfg, seed=123)
    assert [s.response_ids for s in samples] == [r.token_ids for r in g.responses[:4]]
    expected = grpo_advantages([1.0, 0.0, 1.0, 1.0], std="bessel")
    assert [s.advantages[0] for s in samples] == pytest.approx(expected.tolist())
    random_pick = score_group(g, load_config(None, ["rollout.n_train=4", "rollout.n_votes=6"]), seed=123)[0]
    assert len(random_pick) == 4


def test_a_short_tree_is_padded_with_zero_weight_samples():
    """Trees that could not fork give 3 leaves where 4 train: 3 real samples, advantages from them alone, and one
    filler with zero advantages that the update ignores."""
    g = group(["2", "3", "2"])
    cfg = load_config(None, ["method=etmr", "rollout.n_train=4", "rollout.trees=3", "rollout.forks=1",
                             "rollout.branches=1"])
    samples, metrics = score_group(g, cfg, seed=0)
    assert len(samples) == 4 and [s.padding for s in samples] == [False, False, False, True]
    assert [s.advantages[0] for s in samples[:3]] == pytest.approx(grpo_advantages([1.0, 0.0, 1.0]).tolist())
    assert samples[3].advantages == [0.0, 0.0]
    assert metrics["reward"] == pytest.approx(2 / 3), "metrics count the real responses only"
