"""From one prompt's rollouts to training samples: answers, vote, rewards, vote-then-sample, advantages."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ettrl.advantages import AdvantageConfig, compute_advantages
from ettrl.grading import extract_answer, ttrl_answer
from ettrl.methods import method_rewards
from ettrl.rewards import Vote, label_accuracy, reward_accuracy, stratified_pick, true_rewards, vote_then_sample
from ettrl.samples import Group, TrainSample, pad_samples

if TYPE_CHECKING:
    from ettrl.config import Config


def answers_of(group: Group, last_number_fallback: bool = False, vote: str = "boxed") -> list[str | None]:
    """vote=boxed: the last box's content; a response truncated at the length limit has no answer (it never
    votes). vote=ttrl: TTRL's answer string for every response, truncated or not (docs/algorithms.md 1)."""
    if vote == "ttrl":
        return [ttrl_answer(r.text or "") for r in group.responses]
    return [None if r.finish_reason == "length" else extract_answer(r.text, last_number_fallback)
            for r in group.responses]


def advantage_config(cfg: Config) -> AdvantageConfig:
    a = cfg.algo
    return AdvantageConfig(shaping=cfg.shaping, res_alpha=a.res_alpha, res_beta=a.res_beta,
                           res_direction=a.res_direction,
                           clip_beta=a.clip_beta, entropy_alpha=a.entropy_alpha if cfg.entropy_term else 0.0,
                           entropy_kappa=a.entropy_kappa, std=a.std)


def train_indices(n_votes: int, n_train: int, pick: str, seed: int, trees: list[int | None] | None = None) -> list[int]:
    """Which responses train: n_train drawn at random (seeded), the first n_train (TTRL), or stratified over
    the trees (`trees[i]`: response i's root; None or a missing list: each response is its own tree)."""
    n_train = min(n_train, n_votes)
    if pick == "first":
        return list(range(n_train))
    if pick == "stratified":
        trees = trees or [None] * n_votes
        return stratified_pick([i if t is None else t for i, t in enumerate(trees)], n_train, seed)
    return vote_then_sample(n_votes, n_train, seed)


def score_group(group: Group, cfg: Config, seed: int) -> tuple[list[TrainSample], dict[str, float]]:
    """The n_train samples of this prompt, with per-token advantages, and the prompt's metrics.

    A tree with fewer leaves than n_train (it could not fork) gives its real samples, padded to n_train with
    zero-weight fillers (pad_samples); advantages come from the real samples only."""
    rc = cfg.rollout
    answers = answers_of(group, rc.last_number_fallback, rc.vote)
    entropies = [r.entropy for r in group.responses]
    rewards, vote = method_rewards(cfg.method, answers, entropies, cfg.algo, rc.vote)
    keep = train_indices(len(group.responses), rc.n_train, rc.train_pick, seed, [r.tree for r in group.responses])
    chosen = [group.responses[i] for i in keep]
    token_h = torch.nn.utils.rnn.pad_sequence([torch.tensor(r.entropies, dtype=torch.float32) for r in chosen],
                                              batch_first=True)
    adv = compute_advantages([rewards[i] for i in keep], advantage_config(cfg),
                             response_entropies=[entropies[i] for i in keep], token_entropies=token_h)
    samples = [TrainSample(group.prompt_ids, r.token_ids, _per_token(adv[j], len(r.token_ids)))
               for j, r in enumerate(chosen)]
    return pad_samples(samples, cfg.rollout.n_train), _metrics(group, answers, rewards, vote, entropies)


def _per_token(adv: torch.Tensor, n: int) -> list[float]:
    return [float(adv)] * n if adv.dim() == 0 else adv[:n].tolist()


def _metrics(group: Group, answers: Sequence[str | None], rewards: Sequence[float], vote: Vote,
             entropies: Sequence[float]) -> dict[str, float]:
    m = {"reward": sum(rewards) / len(rewards), "majority_ratio": vote.ratio,
         "answered": sum(bool(a) for a in answers) / len(answers),  # ttrl's "" is a vote but no answer
         "entropy": sum(entropies) / len(entropies),
         "response_len": sum(len(r.token_ids) for r in group.responses) / len(group.responses),
         "truncated": sum(r.finish_reason == "length" for r in group.responses) / len(group.responses)}
    truth = group.problem.answer
    if truth is not None:
        m["label_acc"] = label_accuracy(vote.label, truth)
        m["reward_acc"] = reward_accuracy(answers, vote.rewards, truth)
        m["rollout_acc"] = sum(true_rewards(answers, truth)) / len(answers)
    return m
