"""Pseudo-labels and rewards: hand-computed small groups and a brute-force reference for the vote."""
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ettrl.rewards import (
    RewardConfig,
    compute_rewards,
    dare_rewards,
    dare_scores,
    label_accuracy,
    majority_vote,
    rent_rewards,
    reward_accuracy,
    stratified_pick,
    true_rewards,
    ttrl_vote,
    vote_then_sample,
)


def test_majority_vote_groups_equivalent_answers():
    vote = majority_vote(["\\frac{1}{2}", "0.5", "3", None, "3", "1/2"])
    label, ratio, rewards = vote
    assert label == "\\frac{1}{2}"
    assert ratio == pytest.approx(3 / 6)  # None counts in the denominator
    assert rewards == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert vote.class_ids == [0, 0, 1, -1, 1, 0]
    assert vote.label_class == 0


def test_ties_go_to_the_class_seen_first():
    assert majority_vote(["7", "5", "5", "7"]).label == "7"
    assert majority_vote(["5", "7", "7", "5"]).label == "5"
    assert majority_vote([None, "2", "1"]).label == "2"


def test_none_never_votes():
    label, ratio, rewards = majority_vote([None, None, None, "4"])
    assert (label, ratio, rewards) == ("4", 0.25, [0.0, 0.0, 0.0, 1.0])
    vote = majority_vote([None, None])
    assert (vote.label, vote.ratio, vote.rewards, vote.class_ids, vote.label_class) == (None, 0.0, [0.0, 0.0],
                                                                                         [-1, -1], -1)


def test_majority_vote_rejects_empty_input():
    with pytest.raises(ValueError, match=r"^majority_vote needs at least one answer \(got an empty list\)$"):
        majority_vote([])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(0, 4).map(str)), min_size=1, max_size=40))
def test_majority_vote_matches_counter_reference(answers):
    counts = Counter(a for a in answers if a is not None)
    label, ratio, rewards = majority_vote(answers)
    if not counts:
        assert label is None and ratio == 0.0 and rewards == [0.0] * len(answers)
        return
    best = max(counts.values())
    expected = next(a for a in answers if a is not None and counts[a] == best)  # first seen among the largest
    assert label == expected
    assert ratio == best / len(answers)
    assert rewards == [1.0 if a == expected else 0.0 for a in answers]


def test_vote_then_sample_is_seeded_uniform_and_without_replacement():
    picked = vote_then_sample(64, 32, seed=3)
    assert picked == vote_then_sample(64, 32, seed=3)
    assert picked != vote_then_sample(64, 32, seed=4)
    assert picked == sorted(set(picked)) and len(picked) == 32 and all(0 <= i < 64 for i in picked)
    assert picked != list(range(32))  # not "the first 32"
    hits = Counter(i for seed in range(2000) for i in vote_then_sample(64, 32, seed))
    assert all(abs(hits[i] / 2000 - 0.5) < 0.06 for i in range(64))
    assert vote_then_sample(5, 5, seed=0) == [0, 1, 2, 3, 4]
    assert [len(vote_then_sample(5, 1, seed)) for seed in range(3)] == [1, 1, 1]  # one to train is allowed


@pytest.mark.parametrize("n_votes,n_train", [(4, 5), (4, 0), (0, 0)])
def test_vote_then_sample_rejects_bad_sizes(n_votes, n_train):
    with pytest.raises(ValueError, match="n_train"):
        vote_then_sample(n_votes, n_train, seed=0)


def test_ttrl_vote_counts_strings_and_rewards_equivalence_to_the_label():
    """TTRL's vote: "0.5" and "\\frac{1}{2}" are one class under boxed but two strings under ttrl."""
    answers = ["0.5", "0.5", "\\frac{1}{2}", "\\frac{1}{2}", "\\frac{1}{2}", "3", "3", "3", "3"]
    boxed = majority_vote(answers)
    assert (boxed.label, boxed.ratio, boxed.class_ids) == ("0.5", 5 / 9, [0, 0, 0, 0, 0, 1, 1, 1, 1])
    assert boxed.rewards == [1.0] * 5 + [0.0] * 4
    ttrl = ttrl_vote(answers)
    assert (ttrl.label, ttrl.ratio, ttrl.label_class) == ("3", 4 / 9, 2)
    assert ttrl.class_ids == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert ttrl.rewards == [0.0] * 5 + [1.0] * 4
    # the reward grades each answer against the label (TTRL's grade_answer): another string of the same value earns
    vote = ttrl_vote(["\\frac{1}{2}", "\\frac{1}{2}", "0.5", "3"])
    assert (vote.label, vote.ratio, vote.class_ids, vote.rewards) == ("\\frac{1}{2}", 0.5, [0, 0, 1, 2],
                                                                      [1.0, 1.0, 1.0, 0.0])


def test_ttrl_vote_ties_empty_strings_and_none():
    assert ttrl_vote(["7", "5", "5", "7"]).label == "7"  # Counter.most_common: the first seen among the largest
    assert ttrl_vote(["5", "7", "7", "5"]).label == "5"
    vote = ttrl_vote(["", "", "4"])  # TTRL's "" (nothing found) is a class like any other, and can win
    assert (vote.label, vote.ratio, vote.rewards) == ("", 2 / 3, [1.0, 1.0, 0.0])
    vote = ttrl_vote([None, "4", None])
    assert (vote.label, vote.ratio, vote.rewards, vote.class_ids) == ("4", 1 / 3, [0.0, 1.0, 0.0], [-1, 0, -1])
    assert ttrl_vote([None]).label is None
    with pytest.raises(ValueError, match="at least one answer"):
        ttrl_vote([])


def test_stratified_pick_goes_round_robin_over_the_trees():
    trees = [0, 0, 1, 2, 2, 2]  # leaves ordered by root, as the engine returns them
    for seed in range(20):
        per_tree = lambda picks: [sum(trees[i] == t for i in picks) for t in range(3)]  # noqa: E731
        assert per_tree(stratified_pick(trees, 3, seed)) == [1, 1, 1]
        assert per_tree(stratified_pick(trees, 4, seed)) == [2, 1, 1]  # the second round starts at tree 0
        assert per_tree(stratified_pick(trees, 5, seed)) == [2, 1, 2]
        assert stratified_pick(trees, 6, seed) == [0, 1, 2, 3, 4, 5]
        assert 2 in stratified_pick(trees, 3, seed)  # tree 1's only leaf
    assert stratified_pick(trees, 3, seed=1) == stratified_pick(trees, 3, seed=1)
    assert len({tuple(stratified_pick(trees, 3, seed)) for seed in range(100)}) == 6  # 2 x 3 choices, all drawn
    hits = Counter(i for seed in range(3000) for i in stratified_pick(trees, 3, seed))
    assert all(abs(hits[i] / 3000 - 1 / 2) < 0.05 for i in (0, 1)) and hits[2] == 3000
    assert all(abs(hits[i] / 3000 - 1 / 3) < 0.05 for i in (3, 4, 5))


def test_stratified_pick_of_one_response_per_tree_is_the_first_n():
    assert stratified_pick(list(range(64)), 32, seed=7) == list(range(32))  # parallel sampling: TTRL's pick
    assert stratified_pick([3, 1, 2], 2, seed=0) == [1, 2]  # tree order, not position: trees 1 and 2
    with pytest.raises(ValueError, match="n_train"):
        stratified_pick([0, 1], 3, seed=0)


def test_rent_rewards():
    assert rent_rewards([0.5, 1.0, 0.0], beta=2.0) == [-1.0, -2.0, -0.0]
    assert rent_rewards([]) == []


def test_dare_hand_computed():
    answers = ["1", "1.0", "2", None, "3"]
    entropies = [0.5, 0.3, 0.9, 1.0, 2.0]
    # classes: "1" n=2 u=0.4 w=5; "2" n=1 u=0.9 w=1/0.9; "3" n=1 u=2 w=0.5 (eps ignored); M=5
    w = [5.0, 1 / 0.9, 0.5]
    p = [x / sum(w) for x in w]
    b = [(1 - 2 / 5) * (1 - 0.4), (1 - 1 / 5) * (1 - 0.9), (1 - 1 / 5) * 0.0]
    expected = [p[0] + 0.5 * b[0], p[0] + 0.5 * b[0], p[1] + 0.5 * b[1], 0.0, p[2] + 0.5 * b[2]]
    assert dare_rewards(answers, entropies) == pytest.approx(expected, abs=1e-5)
    scores = dare_scores(answers, entropies)
    assert scores.probs == pytest.approx(p, abs=1e-5) and scores.bonuses == pytest.approx(b)
    assert scores.class_ids == [0, 0, 1, -1, 2]


def test_dare_prunes_unlikely_classes_and_renormalises():
    answers = ["1", "1.0", "2", None, "3"]
    entropies = [0.5, 0.3, 0.9, 1.0, 2.0]
    w = [5.0, 1 / 0.9]  # class "3" has p = 0.0756 < tau = 0.1: pruned
    p = [x / sum(w) for x in w]
    b = [0.36, 0.08]
    expected = [p[0] + 0.5 * b[0]] * 2 + [p[1] + 0.5 * b[1], 0.0, 0.0]
    assert dare_rewards(answers, entropies, alpha=0.5, tau=0.1) == pytest.approx(expected, abs=1e-5)


def test_dare_never_prunes_the_top_class_and_handles_no_votes():
    answers = [str(i) for i in range(30)]  # 30 singleton classes, each p = 1/30 < tau
    rewards = dare_rewards(answers, [0.5] * 30, tau=0.05)
    assert sum(r > 0 for r in rewards) >= 1
    assert dare_rewards([None, None], [0.1, 0.2]) == [0.0, 0.0]
    with pytest.raises(ValueError, match="entropies"):
        dare_rewards(["1"], [0.1, 0.2])


def test_label_and_reward_accuracy():
    answers = ["\\frac{1}{2}", "0.5", "3", None]
    label, _, rewards = majority_vote(answers)
    assert label_accuracy(label, "1/2") == 1.0
    assert label_accuracy(label, "3") == 0.0
    assert label_accuracy(None, "3") == 0.0
    assert true_rewards(answers, "3") == [0.0, 0.0, 1.0, 0.0]
    assert reward_accuracy(answers, rewards, "0.5") == 1.0
    assert reward_accuracy(answers, rewards, "3") == 0.25  # only the None response agrees (0 == 0)
    with pytest.raises(ValueError, match="rewards"):
        reward_accuracy(answers, [1.0], "3")


def test_compute_rewards_by_config():
    answers, h = ["1", "2", "1", None], [0.2, 0.4, 0.6, 0.8]
    assert compute_rewards(answers) == [1.0, 0.0, 1.0, 0.0]
    assert compute_rewards(answers, RewardConfig("rent", rent_beta=0.5), h) == [-0.1, -0.2, -0.3, -0.4]
    assert compute_rewards(answers, RewardConfig("dare", dare_tau=0.0), h) == dare_rewards(answers, h, 0.5, 0.0)
    with pytest.raises(ValueError, match="response_entropies"):
        compute_rewards(answers, RewardConfig("dare"))
    with pytest.raises(ValueError, match="reward must be one of"):
        RewardConfig("maj")


def test_rent_default_beta_is_one_and_compute_rewards_passes_dares_tau():
    from ettrl.rewards import RewardConfig, compute_rewards, rent_rewards
    assert rent_rewards([0.5, 2.0]) == [-0.5, -2.0]
    answers, h = ["4", "5", "4", None, "7", None], [0.3, 1.0, 0.5, 2.0, 1.5, 1.0]
    # p ~ n / u: "4" 2/0.4, "5" 1/1, "7" 1/1.5 -> 0.75, 0.15, 0.10; tau 0.12 prunes "7" -> 5/6, 1/6; bonus "4" 0.4
    got = compute_rewards(answers, RewardConfig(reward="dare", dare_alpha=0.5, dare_tau=0.12), h)
    assert got == pytest.approx([5 / 6 + 0.2, 1 / 6, 5 / 6 + 0.2, 0.0, 0.0, 0.0], abs=1e-5)


def test_dare_defaults_and_edge_cases():
    from ettrl.rewards import DareScores, dare_rewards, dare_scores
    answers, h = ["4", "5", "4", None, "7", None], [0.3, 1.0, 0.5, 2.0, 1.5, 1.0]
    # defaults alpha 0.5, tau 0.05: p = 0.75, 0.15, 0.10 (none pruned), bonus 0.4 for "4" only
    assert dare_rewards(answers, h) == pytest.approx([0.95, 0.15, 0.95, 0.0, 0.1, 0.0], abs=1e-5)
    assert dare_rewards(["4", "4"], [0.2, 0.4]) == pytest.approx([1.0, 1.0])  # one class: p = 1, bonus 0
    assert dare_scores([None, None], [1.0, 2.0]) == DareScores([0.0, 0.0], [-1, -1], [], [])
    assert dare_scores([], []) == DareScores([], [], [], [])
    # dare_scores has the same defaults as dare_rewards: alpha 0.5 (the bonus of "4" is 0.4, weighted 0.2)
    assert dare_scores(answers, h).rewards == pytest.approx([0.95, 0.15, 0.95, 0.0, 0.1, 0.0], abs=1e-5)
    # a class whose probability equals tau exactly is kept
    weights = [1 / (1.0 + 1e-6), 19 / (1.0 + 1e-6)]
    tau = weights[0] / sum(weights)
    assert dare_scores(["a"] + ["b"] * 19, [1.0] * 20, tau=tau).probs[0] > 0
