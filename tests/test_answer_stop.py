"""BOXED_ANSWER_REGEX, the stop pattern of rollout.stop_at_answer, run with Python's `re` the way the engine
runs a stop pattern (the response ends at the first position where the text so far holds a match), against the
grader's own extract_answer: the cut text must still give the box's content, and the cut must come where the
first box closes (a brute-force scan of the braces). The engine's own automaton must cut at the same place."""
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from ettrl.grading import BOXED_ANSWER_REGEX, extract_answer

PATTERN = re.compile(BOXED_ANSWER_REGEX)
NESTING = 3  # brace levels inside the box the pattern covers


def stop_point(text: str) -> int | None:
    """The engine's cut: the shortest prefix in which the pattern matches (its end), or None."""
    for end in range(1, len(text) + 1):
        if PATTERN.search(text[:end]):
            return end
    return None


def first_closed_box(text: str) -> int | None:
    """Brute force: the end of the earliest-closing \\boxed{...} whose braces nest at most NESTING levels inside
    it, counting braces as extract_answer does (a backslash escapes the next character)."""
    ends = []
    start = text.find("\\boxed{")
    while start >= 0:
        depth, deepest, i = 0, 0, start + len("\\boxed")
        while i < len(text):
            ch = text[i]
            if ch == "\\":
                if text[i + 1 : i + 2] in ("", "\n"):  # the pattern's escape is "\\." and "." is not a newline
                    break
                i += 2
                continue
            if ch == "{":
                depth += 1
                deepest = max(deepest, depth)
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    if deepest <= NESTING + 1:
                        ends.append(i + 1)
                    break
            i += 1
        start = text.find("\\boxed{", start + 1)
    return min(ends, default=None)


HAND = [
    # text, where the response ends (the match's end), the answer the grader reads from the cut text
    ("so \\boxed{4}. Then more \\boxed{5}", "so \\boxed{4}", "4"),
    ("\\boxed{\\frac{1}{2}} and on", "\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # one nested level
    ("x \\boxed{\\frac{1}{\\sqrt{2}}}.", "x \\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # two
    ("\\boxed{\\{1, 2\\}} so", "\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
    ("\\boxed{a\\}b} c", "\\boxed{a\\}b}", "a\\}b"),
    ("\\boxed{\\boxed{7}} x", "\\boxed{\\boxed{7}", "7"),  # the inner box closes first
    ("\\boxed{}{3}", "\\boxed{}", None),  # an empty box stops the response; it has no answer, as before
]


def test_hand_examples():
    for text, cut, answer in HAND:
        end = stop_point(text)
        assert text[:end] == cut and engine_stop_point(text) == end, text
        assert extract_answer(text[:end]) == answer, text


def test_no_stop_until_the_box_closes():
    assert stop_point("the answer is \\boxed{\\frac{1}{2}") is None  # still open
    assert stop_point("\\boxed 5 and \\fbox{5}") is None  # only the braced \boxed form stops
    assert stop_point("\\boxed{" + "{" * 4 + "1" + "}" * 4 + "}") is None  # deeper than the pattern: runs on
    assert stop_point("\\boxed{" + "{" * 3 + "1" + "}" * 3 + "}") is not None


PIECES = ["\\boxed{", "\\boxed", "{", "}", "}", "\\frac", "\\{", "\\}", "\\", "\\\\", "1", "x", " ", "\n", "$", "."]


def engine_stop_point(text: str) -> int | None:
    """Where the engine's own stop automaton ends the same text, fed in chunks of 3 characters."""
    from engine.stop_regex import StopMatcher, compile_stop_patterns

    matcher = StopMatcher(compile_stop_patterns((), (BOXED_ANSWER_REGEX,)))
    for i in range(0, len(text), 3):
        end = matcher.feed(text[i : i + 3])
        if end is not None:
            return end
    return None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=14).map("".join))
def test_the_cut_is_the_first_closed_box_and_keeps_its_answer(text):
    end = stop_point(text)
    assert end == first_closed_box(text) == engine_stop_point(text)
    if end is not None:
        cut = text[:end]
        content = cut[cut.rfind("\\boxed{") + len("\\boxed{") : -1].strip()
        if "\\boxed" not in content:  # the grader reads the last "\\boxed", even a bare one inside the box
            assert extract_answer(cut) == (content or None)
