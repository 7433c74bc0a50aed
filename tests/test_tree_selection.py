"""Fork-point selection of ETMR: top-N of the metric over the allowed positions, against brute force."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.tree_select import first_marker_token, fork_positions, select_fork_positions


def brute_force_top_n(metric, n, end):
    """Position p is chosen iff fewer than n allowed positions beat it (larger value, or equal and earlier)."""
    allowed = range(1, min(end, len(metric)))

    def beats(q, p):
        return metric[q] > metric[p] or (metric[q] == metric[p] and q < p)

    return [p for p in allowed if sum(beats(q, p) for q in allowed) < n]


def brute_force_with_gap(metric, n, end, gap):
    """Greedy in rank order (larger value, then earlier), passing over positions closer than gap to a chosen one."""
    order = sorted(range(1, min(end, len(metric))), key=lambda t: (-metric[t], t))
    chosen = []
    for t in order:
        if len(chosen) < n and all(abs(t - c) >= gap for c in chosen):
            chosen.append(t)
    return sorted(chosen)


def test_hand_made_example():
    metric = [9.0, 0.1, 2.0, 0.5, 2.0, 3.0, 7.0]
    assert select_fork_positions(metric, 2) == [5, 6]  # index 0 has the largest value but is never a fork
    assert select_fork_positions(metric, 3) == [2, 5, 6]  # tie 2.0 at 2 and 4: the earlier wins
    assert select_fork_positions(metric, 3, end=5) == [2, 3, 4]
    assert select_fork_positions(metric, 0) == []


def test_too_short_root_gives_fewer_forks():
    assert select_fork_positions([1.0], 2) == []
    assert select_fork_positions([1.0, 5.0], 2) == [1]
    assert select_fork_positions([1.0, 5.0, 3.0], 2, end=2) == [1]


def test_negative_n_is_an_error():
    with pytest.raises(ValueError, match="fork points"):
        select_fork_positions([1.0, 2.0], -1)
    with pytest.raises(ValueError, match="min_gap must be >= 1"):
        select_fork_positions([1.0, 2.0], 1, min_gap=0)


def test_min_gap_hand_made():
    metric = [0.0, 1.0, 5.0, 4.0, 3.0, 0.5, 2.0]
    assert select_fork_positions(metric, 2) == [2, 3]  # min_gap 1: today's rule, neighbours allowed
    assert select_fork_positions(metric, 2, min_gap=2) == [2, 4]  # 3 is next to 2
    assert select_fork_positions(metric, 2, min_gap=4) == [2, 6]
    assert select_fork_positions(metric, 3, min_gap=5) == [2]  # nothing else is far enough


@settings(max_examples=300, deadline=None)
@given(metric=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]), max_size=25), n=st.integers(0, 5),
       end=st.integers(0, 30), gap=st.integers(1, 6))
def test_min_gap_matches_brute_force(metric, n, end, gap):
    got = select_fork_positions(metric, n, end, min_gap=gap)
    assert got == brute_force_with_gap(metric, n, end, gap)
    assert all(b - a >= gap for a, b in zip(got, got[1:]))


@settings(max_examples=300, deadline=None)
@given(metric=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 3.5]), max_size=30),
       n=st.integers(0, 6), end=st.integers(0, 35))
def test_matches_brute_force(metric, n, end):
    got = select_fork_positions(metric, n, end)
    assert got == brute_force_top_n(metric, n, end)
    assert got == sorted(set(got)) and len(got) == min(n, max(0, min(end, len(metric)) - 1))


PIECES = ["The", " answer", " is", " \\", "boxed", "{", "1", "2", "}.", " \\boxed{", "3", "}", "x", "\\bo", "xed{"]


def decode_pieces(ids):
    return "".join(PIECES[i] for i in ids)


BOX = ["\\boxed{"]


def test_first_marker_token_hand_made():
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 8]  # The answer is \ boxed { 1 2 }.
    assert first_marker_token(ids, decode_pieces, BOX) == 3  # the token holding the backslash
    ids = [0, 9, 10, 11, 1, 9, 6, 11]  # two boxes: the first one counts
    assert first_marker_token(ids, decode_pieces, BOX) == 1
    assert first_marker_token(ids, decode_pieces, ["answer", "\\boxed{"]) == 1  # the earliest of any marker
    assert first_marker_token(ids, decode_pieces, ["answer", "3}"]) == 2  # "3}" starts in token 2, "answer" in 4
    assert first_marker_token([0, 1, 2], decode_pieces, BOX) is None
    assert first_marker_token(ids, None, BOX) is None
    assert first_marker_token(ids, decode_pieces, []) is None  # no markers: nothing excluded


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(PIECES) - 1), max_size=25), st.sampled_from([BOX, ["x"], ["}", "is"]]))
def test_first_marker_token_brute_force(ids, markers):
    text = decode_pieces(ids)
    starts = [text.find(m) for m in markers if m in text]
    expected = None
    if starts:
        ends = [len(decode_pieces(ids[:k + 1])) for k in range(len(ids))]
        expected = next(k for k, e in enumerate(ends) if e > min(starts))
    assert first_marker_token(ids, decode_pieces, markers) == expected


def test_fork_positions_stop_before_the_first_marker():
    ids = [0, 1, 2, 12, 12, 9, 10, 11, 12, 9]  # The answer is x x \boxed{ 3 } x \boxed{
    metric = [0.0, 1.0, 2.0, 3.0, 0.5, 9.0, 9.0, 9.0, 9.0, 9.0]  # the high values from the first box on are barred
    assert fork_positions(metric, ids, 2, decode_pieces, BOX) == [2, 3]
    assert fork_positions(metric, ids, 2, decode_pieces) == [5, 6]  # no markers: only the first token is barred
    assert fork_positions(metric, ids, 2) == [5, 6]  # token ids only: nothing excluded beyond the first
    assert fork_positions(metric, ids, 2, decode_pieces, BOX, min_gap=2) == [1, 3]
    with pytest.raises(ValueError, match="one metric value per response token"):
        fork_positions(metric[:-1], ids, 2)
