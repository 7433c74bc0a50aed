"""Where an ETMR root forks: the top-N positions of a per-token metric over the allowed response positions.

Allowed positions (docs/algorithms.md section 4): every response index except the first token and every token
from the one that starts the final `\\boxed{` onward (the answer is already being written there).
"""
from __future__ import annotations

from typing import Callable, Sequence

BOX_OPEN = "\\boxed{"


def select_fork_positions(metric: Sequence[float], n: int, end: int | None = None) -> list[int]:
    """The `n` response indices in [1, end) with the largest metric, earlier first on ties, sorted.

    `end` defaults to len(metric). Fewer than `n` come back when fewer positions are allowed.
    """
    if n < 0:
        raise ValueError(f"number of fork points must be >= 0, got {n}")
    end = len(metric) if end is None else min(end, len(metric))
    allowed = range(1, end)
    ranked = sorted(allowed, key=lambda t: (-float(metric[t]), t))
    return sorted(ranked[:n])


def boxed_start_token(token_ids: Sequence[int], decode: Callable[[list[int]], str] | None) -> int | None:
    """Index of the response token containing the first character of the last `\\boxed{`, or None.

    Decoded prefixes grow with the number of tokens, so a binary search over prefix lengths finds the
    smallest prefix whose text reaches past the box's first character. None without a decoder.
    """
    if decode is None or not token_ids:
        return None
    ids = list(token_ids)
    text = decode(ids)
    start = text.rfind(BOX_OPEN)
    if start < 0:
        return None
    lo, hi = 1, len(ids)  # smallest k with len(decode(ids[:k])) > start
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(ids[:mid])) > start:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def fork_positions(metric: Sequence[float], token_ids: Sequence[int], n: int,
                   decode: Callable[[list[int]], str] | None = None) -> list[int]:
    """Fork positions of one finished root: top-`n` metric over [1, start of the last `\\boxed{`)."""
    if len(metric) != len(token_ids):
        raise ValueError(f"one metric value per response token: got {len(metric)} for {len(token_ids)} tokens")
    return select_fork_positions(metric, n, end=boxed_start_token(token_ids, decode))
