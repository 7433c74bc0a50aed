"""Answer grading for test-time RL: extraction, normalisation, bounded equivalence, grouping.

    extract_answer(text) -> str | None        content of the last \\boxed{...}
    extract_choice(text, choices="ABCD")      multiple-choice letter (GPQA-style)
    ttrl_answer(text) -> str                  TTRL's answer string (its extraction and normalisation)
    BOXED_ANSWER_REGEX                        matches a complete \\boxed{...}: a stop pattern for the engine
    is_equivalent(a, b) -> bool               time-bounded, never executes model text
    group_answers(answers) -> list[int]       equivalence-class ids (-1 for None)
"""
from ettrl.grading.equivalence import DEFAULT_TIMEOUT_S, group_answers, is_equivalent, symbolic_equal
from ettrl.grading.extract import BOXED_ANSWER_REGEX, extract_answer, extract_choice
from ettrl.grading.normalize import canonical_key, normalize_answer
from ettrl.grading.ttrl import ttrl_answer

__all__ = ["BOXED_ANSWER_REGEX", "DEFAULT_TIMEOUT_S", "canonical_key", "extract_answer", "extract_choice",
           "group_answers", "is_equivalent", "normalize_answer", "symbolic_equal", "ttrl_answer"]
