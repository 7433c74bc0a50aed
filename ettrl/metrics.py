"""Accuracy metrics over sampled answers: avg@k, maj@k and the unbiased pass@k estimator."""
from __future__ import annotations

from math import comb
from typing import Sequence

from ettrl.grading import group_answers, is_equivalent


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def avg_at_k(correct: Sequence[float]) -> float:
    """Mean accuracy over the samples (the TTRL paper's "pass@1" with k samples)."""
    if not correct:
        raise ValueError("avg@k needs at least one sample")
    return sum(map(bool, correct)) / len(correct)


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """The answer of the largest equivalence class; ties go to the class seen first; None never votes."""
    ids = group_answers(list(answers))
    counts: dict[int, int] = {}
    for i in ids:
        if i >= 0:
            counts[i] = counts.get(i, 0) + 1
    if not counts:
        return None
    best = max(counts, key=lambda c: (counts[c], -ids.index(c)))
    return answers[ids.index(best)]


def maj_at_k(answers: Sequence[str | None], truth: str) -> bool:
    label = majority_answer(answers)
    return label is not None and is_equivalent(label, truth)
