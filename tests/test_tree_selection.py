"""Fork-point selection of ETMR: top-N of the metric over the allowed positions, against brute force."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.tree_select import boxed_start_token, fork_positions, select_fork_positions


def brute_force_top_n(metric, n, end):
    """Position p is chosen iff fewer than n allowed positions beat it (larger value, or equal and earlier)."""
    allowed = range(1, min(end, len(metric)))

    def beats(q, p):
        return metric[q] > metric[p] or (metric[q] == metric[p] and q < p)

    return [p for p in allowed if sum(beats(q, p) for q in allowed) < n]


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


def test_boxed_start_token_hand_made():
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 8]  # The answer is \ boxed { 1 2 }.
    assert boxed_start_token(ids, decode_pieces) == 3  # the token holding the backslash
    ids = [0, 9, 10, 11, 1, 9, 6, 11]  # two boxes: the last one counts
    assert boxed_start_token(ids, decode_pieces) == 5
    assert boxed_start_token([0, 1, 2], decode_pieces) is None
    assert boxed_start_token(ids, None) is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(PIECES) - 1), max_size=25))
def test_boxed_start_token_brute_force(ids):
    text = decode_pieces(ids)
    start = text.rfind("\\boxed{")
    expected = None
    if start >= 0:
        ends = [len(decode_pieces(ids[:k + 1])) for k in range(len(ids))]
        expected = next(k for k, e in enumerate(ends) if e > start)
    assert boxed_start_token(ids, decode_pieces) == expected


def test_fork_positions_stop_before_the_last_box():
    ids = [0, 1, 2, 12, 12, 9, 10, 11]  # The answer is x x \boxed{ 3 }
    metric = [0.0, 1.0, 2.0, 3.0, 0.5, 9.0, 9.0, 9.0]  # the high values inside the box are not allowed
    assert fork_positions(metric, ids, 2, decode_pieces) == [2, 3]
    assert fork_positions(metric, ids, 2) == [5, 6]  # token ids only: nothing excluded beyond the first
    with pytest.raises(ValueError, match="one metric value per response token"):
        fork_positions(metric[:-1], ids, 2)
