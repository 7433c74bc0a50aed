from itertools import combinations
from math import isclose

from hypothesis import given
from hypothesis import strategies as st

from ettrl.metrics import avg_at_k, maj_at_k, majority_answer, pass_at_k


@given(st.lists(st.booleans(), min_size=1, max_size=9), st.data())
def test_pass_at_k_matches_brute_force(correct, data):
    k = data.draw(st.integers(1, len(correct)))
    subsets = list(combinations(correct, k))
    expected = sum(any(s) for s in subsets) / len(subsets)
    assert isclose(pass_at_k(len(correct), sum(correct), k), expected, abs_tol=1e-12)


def test_avg_and_majority():
    assert avg_at_k([True, False, False, True]) == 0.5
    assert majority_answer(["3", "1/2", "0.5", None, "3"]) == "3"  # tie: the class seen first
    assert majority_answer([None, None]) is None
    assert maj_at_k(["7", "\\frac{1}{2}", "0.5"], "1/2") and not maj_at_k(["7", "7", "0.5"], "0.5")
