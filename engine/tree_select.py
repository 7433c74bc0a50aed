"""Where an ETMR root forks: the top-N positions of a per-token metric over the allowed response positions.

Allowed positions (docs/algorithms.md section 4): every response index except the first token, and none at or
after the first occurrence of any `no_fork_after` string in the root's text (ettrl passes `\\boxed{`: the
answer is already being written there). Chosen positions are at least `min_gap` tokens apart.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[list[int]], str]


def select_fork_positions(metric: Sequence[float], n: int, end: int | None = None, min_gap: int = 1) -> list[int]:
    """The `n` response indices in [1, end) with the largest metric, earlier first on ties, sorted; greedily in
    that order, a position closer than `min_gap` to one already chosen is passed over.

    `end` defaults to len(metric). Fewer than `n` come back when fewer positions are allowed.
    """
    if n < 0:
        raise ValueError(f"number of fork points must be >= 0, got {n}")
    if min_gap < 1:
        raise ValueError(f"min_gap must be >= 1 (1: any distinct positions), got {min_gap}")
    end = len(metric) if end is None else min(end, len(metric))
    ranked = sorted(range(1, end), key=lambda t: (-float(metric[t]), t))
    chosen: list[int] = []
    for t in ranked:
        if len(chosen) == n:
            break
        if all(abs(t - c) >= min_gap for c in chosen):
            chosen.append(t)
    return sorted(chosen)


def first_marker_token(token_ids: Sequence[int], decode: Decode | None, markers: Sequence[str]) -> int | None:
    """Index of the response token holding the first character of the earliest occurrence of any marker, or None.

    Decoded prefixes grow with the number of tokens, so a binary search over prefix lengths finds the
    smallest prefix whose text reaches past the marker's first character. None without a decoder or markers.
    """
    if decode is None or not token_ids or not markers:
        return None
    ids = list(token_ids)
    text = decode(ids)
    found = [i for i in (text.find(m) for m in markers) if i >= 0]
    if not found:
        return None
    start = min(found)
    lo, hi = 1, len(ids)  # smallest k with len(decode(ids[:k])) > start
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(ids[:mid])) > start:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def fork_positions(metric: Sequence[float], token_ids: Sequence[int], n: int, decode: Decode | None = None,
                   no_fork_after: Sequence[str] = (), min_gap: int = 1) -> list[int]:
    """Fork positions of one finished root: top-`n` metric over [1, first `no_fork_after` marker), `min_gap`
    apart."""
    if len(metric) != len(token_ids):
        raise ValueError(f"one metric value per response token: got {len(metric)} for {len(token_ids)} tokens")
    end = first_marker_token(token_ids, decode, no_fork_after)
    return select_fork_positions(metric, n, end=end, min_gap=min_gap)
