"""bench/tree_votes.py without sampling: subset shapes, the equal-token interpolation and the paired difference,
on hand-made records (values computed by hand)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_tree_votes", ROOT / "bench" / "tree_votes.py")
tv = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tv  # its dataclass looks its module up
_spec.loader.exec_module(tv)

# Two roots: root 0 answers 4 in 10 tokens (forks ranked [5, 2]), root 1 answers 5 in 12 tokens (forks [3, 7]).
TREE = {"roots": [["4", 10, [5, 2]], ["5", 12, [3, 7]]],
        "branches": [[0, 0, 0, "4", 6], [0, 0, 1, "5", 5], [0, 1, 0, "4", 8], [1, 0, 0, "5", 9], [1, 1, 2, "4", 4]]}


def test_subset_shapes_take_the_first_roots_best_forks_and_first_branches():
    assert tv.shape_leaves(TREE, 1, 1, 1) == (["4", "4"], 16)
    assert tv.shape_leaves(TREE, 1, 1, 2) == (["4", "4", "5"], 21)
    assert tv.shape_leaves(TREE, 1, 2, 1) == (["4", "4", "4"], 24)
    assert tv.shape_leaves(TREE, 2, 2, 3) == (["4", "5", "4", "5", "4", "5", "4"], 54)
    assert tv.shape_leaves(TREE, 2, 1, 1, fork_roots={1}) == (["4", "5", "5"], 31)


def test_vote_aware_rule_branches_only_disagreeing_roots():
    assert tv.disagreeing_roots(TREE, 2) == {0, 1}
    assert tv.disagreeing_roots(TREE, 1) == set()  # one root is unanimous with itself
    unanswered = {"roots": [[None, 10, []], [None, 10, []]], "branches": []}
    assert tv.disagreeing_roots(unanswered, 2) == {0, 1}


def test_parallel_curve_and_interpolation_at_equal_tokens():
    samples = [["4", 10], ["5", 20], ["5", 10], ["5", 10]]  # truth 5: majority right from n = 3 on
    curve = tv.parallel_curve(samples, "5", {})
    assert curve.tokens == [10, 30, 40, 50] and curve.correct == [0.0, 0.0, 1.0, 1.0]
    assert curve.at(5) == 0.0 and curve.at(35) == 0.5 and curve.at(38) == pytest.approx(0.8) and curve.at(99) == 1.0
    assert curve.tokens_of(2) == 30 and curve.tokens_of(8) == 100  # past n = 4 at 12.5 tokens per sample


def test_score_option_pairs_each_problem_at_its_own_tokens():
    record = {"answer": "4", "parallel": {"nostop": [["5", 10], ["4", 10], ["4", 10], ["4", 10]]},
              "trees": {"no_stop": TREE}}
    rows = {r["shape"]: r for r in tv.score_option([record], "no_stop")}
    # parallel: n=1 [5] wrong, n=2 [5, 4] tie -> the first seen (5) wrong, n=3 and n=4 right; tokens 10 20 30 40.
    # 2,1,1: [4, 5, 4, 5] -> tie, 4 first -> right, 37 tokens; parallel at 37 (between n=3 and 4) right -> 0.
    assert rows["2,1,1"]["acc"] == 1.0 and rows["2,1,1"]["tokens"] == 37 and rows["2,1,1"]["diff"] == 0.0
    assert rows["2,1,1"]["ratio"] == pytest.approx(37 / 40) and rows["2,1,1"]["beyond"] == 0.0
    # 2,1,2: [4, 5, 4, 5, 5] -> 5 wrong at 42 tokens, past all 4 parallel samples (clamped to n=4: right) -> -1
    assert rows["2,1,2"]["diff"] == -1.0 and rows["2,1,2"]["beyond"] == 1.0


def test_per_problem_averages_each_problems_differences_over_the_rows_shapes():
    rows = [{"shape": "2,1,1", "diffs": [0.0, 1.0]}, {"shape": "2,1,2", "diffs": [-1.0, 0.5]},
            {"shape": "3,1,1", "diffs": [9.0, 9.0]}]
    assert tv.per_problem(rows[:2], 2) == [-0.5, 0.75]
