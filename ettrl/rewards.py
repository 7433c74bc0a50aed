"""Pseudo-labels and rewards for test-time RL (docs/algorithms.md sections 1 and 6).

    majority_vote(answers) -> Vote(label, ratio, rewards, class_ids, label_class)   unpacks as the 3-tuple
    ttrl_vote(answers) -> Vote        TTRL's vote: answers are string classes, rewards by equivalence to the label
    vote_then_sample(n_votes, n_train, seed) -> indices of the responses that train
    stratified_pick(trees, n_train, seed) -> the same, every tree contributing (round-robin over trees)
    rent_rewards(response_entropies, beta) / dare_rewards(answers, response_entropies, ...)
    REWARDS[name](answers, response_entropies, vote, params) -> one reward per response, by reward name
    compute_rewards(answers, RewardConfig, response_entropies) -> the reward a RewardConfig picks
    label_accuracy / reward_accuracy: logging-only metrics against a known ground truth
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from ettrl.grading import group_answers, is_equivalent


@dataclass(frozen=True)
class Vote:
    label: str | None      # first-seen member of the largest equivalence class; None if nobody answered
    ratio: float           # |majority class| / number of responses (None answers count in the denominator)
    rewards: list[float]   # TTRL reward: 1.0 for responses equivalent to the label, else 0.0
    class_ids: list[int]   # equivalence class per response, -1 for None
    label_class: int       # class id of the label, -1 if nobody answered

    def __iter__(self) -> Iterator[object]:
        """Unpacks as (label, ratio, rewards), the contract of the trainer; the rest are attributes."""
        return iter((self.label, self.ratio, self.rewards))


def majority_vote(answers: Sequence[str | None]) -> Vote:
    """Majority vote over equivalence classes: None never votes; ties go to the class seen first."""
    if not answers:
        raise ValueError("majority_vote needs at least one answer (got an empty list)")
    class_ids = group_answers(list(answers))
    counts = _class_counts(class_ids)
    if not counts:
        return Vote(None, 0.0, [0.0] * len(answers), class_ids, -1)
    label_class = max(range(len(counts)), key=lambda c: (counts[c], -c))
    label = answers[class_ids.index(label_class)]
    rewards = [1.0 if c == label_class else 0.0 for c in class_ids]
    return Vote(label, counts[label_class] / len(answers), rewards, class_ids, label_class)


def ttrl_vote(answers: Sequence[str | None]) -> Vote:
    """TTRL's majority vote over answer strings (`ettrl.grading.ttrl_answer` gives them), as PRIME-RL/TTRL's
    verl/utils/reward_score/ttrl/ttt_metrics.py `test_time_train_metrics`: the label is the most common string
    (Counter.most_common: ties go to the string seen first), ratio = its count / number of responses, and each
    response's reward is whether its answer is equivalent to the label (TTRL grades it with its `grade_answer`,
    here `is_equivalent`), so "0.5" earns 1 under the label "\\frac{1}{2}" though it voted for another class.
    None (never produced by TTRL's extraction) does not vote and gets 0."""
    if not answers:
        raise ValueError("ttrl_vote needs at least one answer (got an empty list)")
    first_seen: dict[str, int] = {}
    class_ids = [-1 if a is None else first_seen.setdefault(a, len(first_seen)) for a in answers]
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return Vote(None, 0.0, [0.0] * len(answers), class_ids, -1)
    label, count = counts.most_common(1)[0]
    reward_of = {a: float(is_equivalent(a, label)) for a in first_seen}
    rewards = [0.0 if a is None else reward_of[a] for a in answers]
    return Vote(label, count / len(answers), rewards, class_ids, first_seen[label])


VOTES = {"boxed": majority_vote, "ttrl": ttrl_vote}  # rollout.vote


def _class_counts(class_ids: list[int]) -> list[int]:
    counts = [0] * (max(class_ids, default=-1) + 1)
    for c in class_ids:
        if c >= 0:
            counts[c] += 1
    return counts


def vote_then_sample(n_votes: int, n_train: int, seed: int) -> list[int]:
    """Indices (sorted) of the n_train responses, drawn uniformly without replacement from n_votes."""
    if not 0 < n_train <= n_votes:
        raise ValueError(f"need 0 < n_train <= n_votes, got n_train={n_train}, n_votes={n_votes}")
    return sorted(random.Random(seed).sample(range(n_votes), n_train))


def stratified_pick(trees: Sequence[int], n_train: int, seed: int) -> list[int]:
    """Indices (sorted) of n_train responses taken round-robin over the trees (`trees[i]`: response i's tree):
    one from each tree in tree order, then a second from each, ... Within a tree the order is a seeded shuffle.
    Every tree contributes while n_train >= the number of trees; trees differ by at most one pick. With one
    response per tree (parallel sampling) this is the first n_train, TTRL's pick (docs/algorithms.md 1)."""
    if not 0 < n_train <= len(trees):
        raise ValueError(f"need 0 < n_train <= number of responses, got n_train={n_train}, {len(trees)} responses")
    rng = random.Random(seed)
    members: dict[int, list[int]] = {}
    for i, tree in enumerate(trees):
        members.setdefault(tree, []).append(i)
    order = [members[t] for t in sorted(members)]
    for leaves in order:
        rng.shuffle(leaves)
    picked = [leaves[k] for k in range(max(map(len, order))) for leaves in order if k < len(leaves)]
    return sorted(picked[:n_train])


def rent_rewards(response_entropies: Sequence[float], beta: float = 1.0) -> list[float]:
    """RENT / EM-RL: R_i = -beta * H_resp(o_i). No labels, no voting."""
    return [-beta * float(h) for h in response_entropies]


class DareScores(NamedTuple):
    rewards: list[float]
    class_ids: list[int]
    probs: list[float]     # p(y) per class after pruning and renormalisation (0 for pruned classes)
    bonuses: list[float]   # b(y) per class


def dare_scores(answers: Sequence[str | None], response_entropies: Sequence[float], alpha: float = 0.5,
                tau: float = 0.05, eps: float = 1e-6) -> DareScores:
    """DARE with the per-class details (see `dare_rewards`)."""
    if len(answers) != len(response_entropies):
        raise ValueError(f"{len(answers)} answers but {len(response_entropies)} response entropies")
    class_ids = group_answers(list(answers))
    counts = _class_counts(class_ids)
    if not counts:
        return DareScores([0.0] * len(answers), class_ids, [], [])
    entropy_sums = [0.0] * len(counts)
    for c, h in zip(class_ids, response_entropies):
        if c >= 0:
            entropy_sums[c] += float(h)
    mean_entropy = [s / n for s, n in zip(entropy_sums, counts)]
    weights = [n / (u + eps) for n, u in zip(counts, mean_entropy)]
    probs = _prune_and_renormalise([w / sum(weights) for w in weights], tau)
    m = len(answers)
    bonuses = [(1 - n / m) * (1 - min(u, 1.0)) for n, u in zip(counts, mean_entropy)]
    rewards = [0.0 if c < 0 or probs[c] == 0.0 else probs[c] + alpha * bonuses[c] for c in class_ids]
    return DareScores(rewards, class_ids, probs, bonuses)


def _prune_and_renormalise(probs: list[float], tau: float) -> list[float]:
    """Drop classes with p < tau (the most probable class always survives) and renormalise."""
    top = max(probs)
    kept = [p if p >= tau or p == top else 0.0 for p in probs]
    total = sum(kept)
    return [p / total for p in kept]


def dare_rewards(answers: Sequence[str | None], response_entropies: Sequence[float], alpha: float = 0.5,
                 tau: float = 0.05, eps: float = 1e-6) -> list[float]:
    """DARE reward r_i = p(y_i) + alpha * b(y_i) (docs/algorithms.md section 6).

    p(y) ∝ n(y) / (u(y) + eps) over answer classes (n: count, u: mean response entropy), classes with
    p < tau are pruned (reward 0) and p renormalised; b(y) = (1 - n(y)/M)(1 - min(u(y), 1)), M = number of
    responses. None answers get 0.
    """
    return dare_scores(answers, response_entropies, alpha, tau, eps).rewards


def label_accuracy(label: str | None, ground_truth: str) -> float:
    """1.0 if the pseudo-label is equivalent to the ground truth (logging only, never a training signal)."""
    return float(is_equivalent(label, ground_truth))


def true_rewards(answers: Sequence[str | None], ground_truth: str) -> list[float]:
    """Ground-truth reward per response; equal strings are checked once."""
    cache: dict[str, float] = {}
    out = []
    for a in answers:
        if a is None:
            out.append(0.0)
            continue
        if a not in cache:
            cache[a] = float(is_equivalent(a, ground_truth))
        out.append(cache[a])
    return out


def reward_accuracy(answers: Sequence[str | None], rewards: Sequence[float], ground_truth: str) -> float:
    """Fraction of responses whose pseudo-reward equals the ground-truth reward (logging only)."""
    if len(answers) != len(rewards):
        raise ValueError(f"{len(answers)} answers but {len(rewards)} rewards")
    truth = true_rewards(answers, ground_truth)
    return sum(float(r) == t for r, t in zip(rewards, truth)) / len(answers)


class RewardParams(Protocol):
    """The reward parameters a reward function reads (ettrl.config.AlgoConfig and RewardConfig have them)."""
    rent_beta: float
    dare_alpha: float
    dare_tau: float


RewardFn = Callable[[Sequence[str | None], Sequence[float], Vote, RewardParams], list[float]]


def _majority(answers: Sequence[str | None], entropies: Sequence[float], vote: Vote,
              params: RewardParams) -> list[float]:
    return list(vote.rewards)


def _rent(answers: Sequence[str | None], entropies: Sequence[float], vote: Vote, params: RewardParams) -> list[float]:
    return rent_rewards(entropies, params.rent_beta)


def _dare(answers: Sequence[str | None], entropies: Sequence[float], vote: Vote, params: RewardParams) -> list[float]:
    return dare_rewards(answers, entropies, params.dare_alpha, params.dare_tau)


# reward name -> fn(answers, response entropies, the majority Vote, RewardParams) -> one reward per response:
# "majority" (the TTRL vote), "rent" (negative response entropy), "dare" (entropy-weighted vote)
REWARDS: dict[str, RewardFn] = {"majority": _majority, "rent": _rent, "dare": _dare}


@dataclass
class RewardConfig:
    reward: str = "majority"  # a name in REWARDS: majority | rent | dare
    rent_beta: float = 1.0
    dare_alpha: float = 0.5
    dare_tau: float = 0.05

    def __post_init__(self) -> None:
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {tuple(REWARDS)}, got {self.reward!r}")


def compute_rewards(answers: Sequence[str | None], config: RewardConfig | None = None,
                    response_entropies: Sequence[float] | None = None) -> list[float]:
    """Per-response rewards of one prompt's group under `config.reward`."""
    config = config or RewardConfig()
    if config.reward == "majority":
        return majority_vote(answers).rewards
    if response_entropies is None:
        raise ValueError(f"reward {config.reward!r} needs response_entropies (mean token entropy per response)")
    if config.reward == "rent":
        return rent_rewards(response_entropies, config.rent_beta)
    return dare_rewards(answers, response_entropies, config.dare_alpha, config.dare_tau)
