"""What flows through a training step, in pipeline order: the rollout's `Response`s of one prompt (a `Group`),
then the `TrainSample`s that scoring makes of them for the update.

    rollout.py  -> Group(problem, prompt_ids, [Response], decoded_tokens)
    scoring.py  -> [TrainSample(prompt_ids, response_ids, advantages)], padded to n_train by pad_samples
    update.py   -> the optimizer steps
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ettrl.data import Problem


@dataclass
class Response:
    token_ids: list[int]
    text: str | None  # None where the engine has no tokenizer
    entropies: list[float]  # full-vocabulary entropy of the sampling distribution at each token
    finish_reason: str
    tree: int | None = None  # the root a tree leaf grew from; None for a parallel sample (its own stratum)

    @property
    def entropy(self) -> float:
        return sum(self.entropies) / max(1, len(self.entropies))


@dataclass
class Group:
    problem: Problem
    prompt_ids: list[int]
    responses: list[Response]
    decoded_tokens: int  # tokens the engine decoded for this prompt (trees reuse shared prefixes)


@dataclass
class TrainSample:
    prompt_ids: list[int]
    response_ids: list[int]
    advantages: list[float]  # one per response token
    padding: bool = False  # a zero-weight filler (pad_samples): no token of it counts, it moves no gradient


def pad_samples(samples: list[TrainSample], count: int) -> list[TrainSample]:
    """`samples` filled up to `count` with zero-weight copies of the last one.

    A prompt whose trees could not fork has fewer responses than n_train; a fixed sample count keeps every
    rank's micro-batch count fixed (DeepSpeed needs it) and the mini-batches aligned with prompts. The filler
    changes no gradient and no advantage (compute advantages from the real samples before padding)."""
    if not samples:
        raise ValueError("pad_samples needs at least one real sample to copy")
    if len(samples) > count:
        raise ValueError(f"{len(samples)} samples are more than the {count} to pad to")
    last = samples[-1]
    filler = replace(last, advantages=[0.0] * len(last.response_ids), padding=True)
    return samples + [filler] * (count - len(samples))
