"""A vote-aware ETMR tree: branches are spent only on prompts whose roots disagree.

`branch_where_roots_disagree()` is a `select_roots` callback for `LLM.sample_tree`: called once per prompt when
its M roots have finished, it forks every root when their answers (the trainer's vote: a root cut by the length
limit has no answer) are not one unanimous class, and none when they are. The engine knows nothing of votes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from ettrl.grading import extract_answer
from ettrl.rewards import majority_vote

if TYPE_CHECKING:
    from engine.tree import Leaf


def leaf_answer(leaf: Leaf) -> str | None:
    """A finished response's answer as the trainer votes it: none when the length limit cut it."""
    return None if leaf.finish_reason == "length" else extract_answer(leaf.text)


def roots_disagree(answers: Sequence[str | None]) -> bool:
    """False only when every root answered and all answers fall in one equivalence class."""
    vote = majority_vote(list(answers))
    return not (vote.label is not None and vote.ratio == 1.0)


def branch_where_roots_disagree(answer_of: Callable[[Leaf], str | None] = leaf_answer
                                ) -> Callable[[int, list[Leaf]], Iterable[int]]:
    def select(prompt_index: int, roots: list[Leaf]) -> Iterable[int]:
        return range(len(roots)) if roots_disagree([answer_of(r) for r in roots]) else []
    return select
