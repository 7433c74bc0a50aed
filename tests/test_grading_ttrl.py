"""TTRL's answer strings (ettrl.grading.ttrl_answer) on hand-worked texts, one per rule of PRIME-RL/TTRL's
qwen_math_parser.extract_answer(text, "math") and strip_string, quirks included. Each expected string was
worked out from those rules (and agrees with TTRL's own code)."""
import pytest

from ettrl.grading import ttrl_answer

CASES = [
    # the last "boxed", brace-counted; its content normalised
    ("so \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}"),  # dfrac -> frac
    ("so \\boxed{0.5}.", "0.5"),  # a decimal stays a decimal: another string than \frac{1}{2}
    ("first \\boxed{3} then \\boxed{4}", "4"),
    ("we have \\boxed{12", "12"),  # truncated inside the box: what was written votes
    ("\\boxed 5$ ok", "5"),  # no brace: up to the next $
    ("\\boxed{1/2}", "\\frac{1}{2}"),  # a/b of plain integers -> \frac{a}{b}
    ("\\boxed{\\frac12}", "\\frac{1}{2}"),
    ("\\boxed{x = 5}", "5"),  # a left side of at most 2 characters goes
    ("\\boxed{5 \\text{ cm}}", "5"),  # a trailing \text{...} goes
    ("\\boxed{30^\\circ}", "30"),
    ("\\boxed{10.00\\%}", "10"),  # percent goes, then .00
    ("\\boxed{2.0}", "2"),
    ("\\boxed{2.50}", "2.50"),  # only zeros right after the point go
    ("\\boxed{007}", "7"),  # word2number reads a digit string as an int
    ("\\boxed{three}", "3"),
    ("\\boxed{\\{1, 2\\}}", "{1,2}"),  # \{ -> {, spaces go
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)"),
    ("\\boxed{a+b}", "+b"),  # "a" is one of TTRL's unit words
    ("\\boxed{m}", "m"),  # ... but a unit that would leave nothing stays
    ("\\boxed{-3}", "-3"),
    # no box: the answer-is phrases, then the last number, then ""
    ("The final answer is $7$. I hope it is correct.", "7"),
    ("The answer is 42.", "42"),
    ("The answer is: 6", "6"),
    ("the answer is seven apples and two pears", "9"),  # number words in a sentence add up ("and" deleted)
    ("we get 3 then 4,500 cookies", "4500"),  # commas go before the last number is taken
    ("it is -0.25 or .5", "0.5"),
    ("\\fbox{5}", "5"),  # only "boxed" is looked for; the last number finds it
    ("hmm", ""),
]


@pytest.mark.parametrize("text, expected", CASES)
def test_ttrl_answer(text, expected):
    assert ttrl_answer(text) == expected

