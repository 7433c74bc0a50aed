"""The RL methods as one table: how each rolls out, what it rewards, how it shapes the advantage.

Config validation, scoring and the trainer read `method_spec(name)`; adding a method is one `Method(...)` line
(plus a reward function in ettrl/rewards.py's REWARDS if it needs a new reward).

    rollout  ROLLOUTS: "parallel" (rollout.n_votes samples) | "tree" (ETMR entropy-fork trees)
    reward   ettrl/rewards.py REWARDS: "majority" (TTRL vote) | "rent" (negative response entropy) | "dare"
             (entropy-weighted vote)
    shaping  ettrl/advantages.py SHAPINGS: "none" (GRPO) | "res" (EAR Adv-Res) | "clip" (EAR Adv-Clip);
             algo.reshape overrides it
    entropy_term  the Cheng et al. per-token bonus on by default (algo.entropy_adv turns it on for any method)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ettrl.advantages import SHAPINGS
from ettrl.rewards import REWARDS, VOTES, RewardParams, Vote

ROLLOUTS = ("parallel", "tree")


@dataclass(frozen=True)
class Method:
    name: str
    rollout: str
    reward: str
    shaping: str
    about: str
    entropy_term: bool = False


_TABLE = (
    Method("ttrl", "parallel", "majority", "none", "TTRL: majority-vote reward, GRPO advantages"),
    Method("etmr", "tree", "majority", "none", "ETMR: entropy-fork tree rollouts, majority vote over the leaves"),
    Method("ear", "parallel", "majority", "res", "EAR: TTRL with entropy-based advantage reshaping (Adv-Res)"),
    Method("ettrl", "tree", "majority", "res", "ETTRL: ETMR trees + Adv-Res"),
    Method("rent", "parallel", "rent", "none", "RENT / EM-RL: reward = -beta * response entropy, no vote"),
    Method("dare", "parallel", "dare", "none", "DARE: vote weighted by answer-class entropy, with a bonus"),
)
METHODS: dict[str, Method] = {m.name: m for m in _TABLE}


def method_spec(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method={name!r} is unknown; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_rewards(name: str, answers: Sequence[str | None], entropies: Sequence[float], algo: RewardParams,
                   vote: str = "boxed") -> tuple[list[float], Vote]:
    """The method's rewards for one prompt's responses, and the majority vote (always logged); `vote` names the
    vote (rollout.vote: boxed | ttrl, ettrl/rewards.py VOTES)."""
    majority = VOTES[vote](answers)
    return REWARDS[method_spec(name).reward](answers, entropies, majority, algo), majority


def _check_table() -> None:
    for m in _TABLE:
        if m.rollout not in ROLLOUTS or m.reward not in REWARDS or m.shaping not in SHAPINGS:
            raise AssertionError(f"methods table: {m} has an unknown rollout, reward or shaping")


_check_table()
