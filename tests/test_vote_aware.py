"""The vote-aware tree's root selection (ettrl/vote_aware.py) on hand-made roots, and through sample_tree."""
from types import SimpleNamespace

from ettrl.vote_aware import branch_where_roots_disagree, leaf_answer, roots_disagree


def leaf(text, finish="stop"):
    return SimpleNamespace(text=text, finish_reason=finish)


def test_roots_disagree_by_equivalence_class():
    assert not roots_disagree(["12", "12", "12.0"])  # one class (math equivalence): settled
    assert roots_disagree(["12", "13", "12"])
    assert roots_disagree(["12", None, "12"])  # a root without an answer: not settled
    assert roots_disagree([None, None])


def test_selector_forks_all_roots_or_none():
    select = branch_where_roots_disagree()
    same = [leaf("so \\boxed{4}"), leaf("\\boxed{4}.")]
    assert list(select(0, same)) == []
    mixed = [leaf("\\boxed{4}"), leaf("\\boxed{5}"), leaf("\\boxed{4}")]
    assert list(select(3, mixed)) == [0, 1, 2]
    cut = [leaf("\\boxed{4}"), leaf("\\boxed{4}", finish="length")]  # a root cut by the limit has no answer
    assert leaf_answer(cut[1]) is None and list(select(0, cut)) == [0, 1]
