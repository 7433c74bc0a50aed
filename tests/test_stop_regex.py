"""Stop patterns (engine/stop_regex.py, engine/stop_checker.py) against Python's `re` as the reference."""
import re
import signal

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.stop_checker import TextStop
from engine.stop_regex import CHAR, MAX_NFA_NODES, StopMatcher, compile_stop_patterns

# ---- random patterns: each rendered twice, with `$` and with `$` replaced by what never matches ----------------
ATOMS = ["a", "b", ".", "[ab]", "[^a]", "\\d", "\\w", "\\s", "\\n", "1", "[a-c1]", "(?i:A)"]


@st.composite
def patterns(draw, depth=2):
    """(pattern for the engine, the same with `$` as `(?!)` for positions where the text has not ended)."""
    if depth == 0 or draw(st.booleans()):
        atom = draw(st.sampled_from(ATOMS))
        return atom, atom
    kind = draw(st.sampled_from(["seq", "alt", "rep"]))
    if kind == "seq":
        parts = draw(st.lists(patterns(depth=depth - 1), min_size=1, max_size=3))
        return "".join(p for p, _ in parts), "".join(q for _, q in parts)
    if kind == "alt":
        parts = draw(st.lists(patterns(depth=depth - 1), min_size=2, max_size=3))
        return "(?:" + "|".join(p for p, _ in parts) + ")", "(?:" + "|".join(q for _, q in parts) + ")"
    inner, never = draw(patterns(depth=depth - 1))
    quantifier = draw(st.sampled_from(["*", "+", "?", "{0,2}", "{1,3}", "{2}", "*?", "+?", "{1,2}?"]))
    return f"(?:{inner}){quantifier}", f"(?:{never}){quantifier}"


@st.composite
def anchored(draw):
    body, never = draw(patterns())
    head = draw(st.sampled_from(["", "^", "\\A"]))
    tail = draw(st.sampled_from(["", "", "$", "\\Z"]))
    return head + body + tail, head + never + ("(?!)" if tail else "")


def reference(pairs, text, ends):
    """(start, end) of the match that ends first, leftmost among those; `$` holds only at the ends in `ends`."""
    compiled = [(re.compile(p), re.compile(q)) for p, q in pairs]
    for e in range(1, len(text) + 1):
        for s in range(e):
            if any((p if e in ends else q).fullmatch(text, s, e) for p, q in compiled):
                return s, e
    return None


def stream(regexes, text, cuts):
    """What the engine's matcher reports when `text` arrives in pieces cut at `cuts`."""
    matcher = StopMatcher(compile_stop_patterns((), tuple(regexes)))
    prev = 0
    for cut in [*cuts, len(text)]:
        end = matcher.feed(text[prev:cut])
        if end is not None:
            return matcher.match_start(text[:matcher.length], end), end
        prev = cut
    return None


@settings(max_examples=400, deadline=None)
@given(st.lists(anchored(), min_size=1, max_size=2), st.text(alphabet="ab1A \n", max_size=14), st.data())
def test_matches_like_python_re(pairs, text, data):
    assume(not any(re.fullmatch(p, "") for p, _ in pairs))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=4)))) if text else []
    cuts = [c for c in cuts if c < len(text)]
    assert stream([p for p, _ in pairs], text, cuts) == reference(pairs, text, {*cuts, len(text)})


@settings(max_examples=200, deadline=None)
@given(anchored())
def test_refuses_exactly_the_patterns_that_match_empty(pair):
    pattern = pair[0]
    if re.fullmatch(pattern, ""):
        with pytest.raises(ValueError, match="matches the empty string"):
            compile_stop_patterns((), (pattern,))
    else:
        assert compile_stop_patterns((), (pattern,)) is not None


def test_earliest_end_then_leftmost_start():
    assert stream(["ab|b"], "xxab", []) == (2, 4)
    assert stream(["b|ab"], "xxab", []) == (2, 4)  # leftmost start among matches ending first, whatever the order
    assert stream(["a+"], "xaaa", []) == (1, 2)  # the first match to complete, not the longest
    assert stream(["bc", "abcd"], "abcd", []) == (1, 3)
    assert stream(["a$"], "aab", [1]) == (0, 1)  # `$`: the end of the text so far, checked per piece
    assert stream(["a$"], "aab", []) is None


BOXED = r"\\boxed\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\}"


def test_first_complete_boxed_answer_with_nested_braces():
    text = r"so x = \boxed{\frac{1}{2}}. Also \boxed{3}"
    start, end = stream([BOXED], text, [5, 13, 20, 25])
    assert text[start:end] == r"\boxed{\frac{1}{2}}"
    assert stream([BOXED], r"\boxed{\frac{1}{2", []) is None  # not complete yet


def catastrophic_cases():
    return [("(a+)+$", "a" * 5000 + "b"), ("(a+)+b", "a" * 5000), ("(a|aa)*c", "a" * 5000), ("(x+x+)+y", "x" * 3000)]


@pytest.mark.parametrize("pattern,text", catastrophic_cases())
def test_catastrophic_patterns_finish_in_linear_time(pattern, text):
    """Python's backtracking `re` would not finish these in a lifetime; the automaton reads each character once."""
    def too_slow(*_):
        raise TimeoutError(f"{pattern} did not finish")
    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        cuts = [] if pattern.endswith("$") else list(range(7, len(text), 7))  # `$` would hold at each cut
        assert stream([pattern], text, cuts) is None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("pattern,message", [
    ("(a)\\1", "not supported"), ("a(?=b)", "not supported"), ("(?<!a)b", "not supported"),
    ("\\bword", "not supported"), ("a++", "not supported"), ("(?>ab)", "not supported"),
    ("(?m)^a", "flags are not supported"), ("[", "invalid stop_regex"), ("a*", "matches the empty string"),
    ("(?:a{1000}){1000}", f"exceeds {MAX_NFA_NODES} states"),
])
def test_unsupported_or_bad_patterns_are_refused(pattern, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        compile_stop_patterns((), (pattern,))


def test_stop_strings_are_literals():
    patterns = compile_stop_patterns(("a.b", "(x)"), ())
    matcher = StopMatcher(patterns)
    assert matcher.feed("acb axb (x") is None
    assert matcher.feed(")") == 11
    assert matcher.match_start("acb axb (x)", 11) == 8


# ---- the live start: where a partial match that may still complete starts ---------------------------------

def live_start_brute_force(patterns, text):
    """The earliest i where the forward automaton started at i is still alive after text[i:] (len(text) if none)."""
    auto = patterns.forward
    for i in range(len(text) + 1):
        state = auto.closure([auto.start], i == 0, False)
        for c in text[i:]:
            state = auto.step(state, c)
        if any(auto.nfa.kind[n] == CHAR for n in state):
            return i
    return len(text)


def live_starts(patterns, text, cuts):
    """(text so far, matcher.live_start) after each piece, until a match."""
    matcher, prev, out = StopMatcher(patterns), 0, []
    for cut in [*cuts, len(text)]:
        if matcher.feed(text[prev:cut]) is not None:
            break
        out.append((text[:cut], matcher.live_start))
        prev = cut
    return out


LIVE_CASES = [(("\n\n",), ()), (("</answer>", "\n\n"), ()), ((), (r"\\boxed\{[^}]*\}",)), ((), ("ab|b", "abc|bd")),
              ((), ("a+b",)), ((), (r"(?:a|\\b)x{2,3}o",)), (("{1}",), (r"\\boxed\{[^}]*\}", "1+ 1"))]
LIVE_PIECES = ["\\boxed{", "\\bo", "{", "}", "a", "b", "ab", "x", "o", "1", " ", "\n", "</ans", "wer>", "</answer"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(LIVE_CASES), st.lists(st.sampled_from(LIVE_PIECES), max_size=12), st.data())
def test_live_start_is_the_earliest_start_of_a_live_partial_match(case, pieces, data):
    regex = pytest.importorskip("regex")  # partial matching: could text[i:] still grow into a match
    strings, regexes = case
    patterns = compile_stop_patterns(strings, regexes)
    text = "".join(pieces)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=5)))) if text else []
    compiled = [regex.compile(p) for p in patterns.sources]
    for seen, start in live_starts(patterns, text, [c for c in cuts if c < len(text)]):
        assert start == live_start_brute_force(patterns, seen)
        partial = [i for i in range(len(seen)) if any(p.fullmatch(seen, i, partial=True) for p in compiled)]
        assert start == (partial[0] if partial else len(seen))
        if not regexes:  # stop strings: at most the longest one less a character is held back
            assert len(seen) - start <= max(map(len, strings)) - 1


@settings(max_examples=200, deadline=None)
@given(st.lists(anchored(), min_size=1, max_size=2), st.text(alphabet="ab1A \n", max_size=14), st.data())
def test_live_start_of_random_patterns(pairs, text, data):
    assume(not any(re.fullmatch(p, "") for p, _ in pairs))
    patterns = compile_stop_patterns((), tuple(p for p, _ in pairs))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=4)))) if text else []
    for seen, start in live_starts(patterns, text, [c for c in cuts if c < len(text)]):
        assert start == live_start_brute_force(patterns, seen)


def test_live_start_examples():
    boxed = compile_stop_patterns((), (r"\\boxed\{[^}]*\}",))
    assert live_starts(boxed, "so \\boxed{12", [3, 9])[-1] == ("so \\boxed{12", 3)
    assert live_starts(boxed, "so \\boxed 12", [])[-1] == ("so \\boxed 12", 12)
    blank = compile_stop_patterns(("\n\n",), ())
    assert [s for _, s in live_starts(blank, "a\nb\n", [1, 2, 3])] == [1, 1, 3, 3]


# ---- the text side: incremental detokenization ---------------------------------------------------------------

def byte_decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def feed_tokens(stop, ids):
    for k in range(1, len(ids) + 1):
        if stop.step(ids[:k]):
            return k
    return None


def test_multibyte_characters_split_over_tokens():
    ids = list("x=é!".encode())  # é is two bytes: two tokens
    stop = TextStop(compile_stop_patterns((), ("é",)), byte_decode, 0)
    assert feed_tokens(stop, ids) == 4  # matched when the second byte of é arrives
    assert stop.text == "x=é" and stop.matched == "é"
    assert stop.output_text(False) == "x=" and stop.output_text(True) == "x=é"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab é€\n", max_size=12), st.sampled_from(["é", "b€", "a\\s", "€+a"]))
def test_incremental_text_equals_the_whole_decode(text, pattern):
    ids = list(text.encode())
    stop = TextStop(compile_stop_patterns((), (pattern,)), byte_decode, 0)
    k = feed_tokens(stop, ids)
    whole = byte_decode(ids[:k] if k else ids)
    assert stop.text == whole
    expected = next((j for j in range(1, len(ids) + 1) if re.search(pattern, byte_decode(ids[:j]))), None)
    assert k == expected


def test_fork_restarts_from_the_parent_text_at_the_fork():
    ids = list(b"aaXbbXccY")
    parent = TextStop(compile_stop_patterns((), ("Y",)), byte_decode, 0)
    assert feed_tokens(parent, ids) == 9
    child = parent.fork(ids[:4], 4)
    assert child.text == "aaXb" and child.span is None
    assert not child.step(ids[:4] + [ord("c")]) and child.step(ids[:4] + list(b"cY"))
    assert child.text == "aaXbcY" and child.matched == "Y"


def test_a_fork_knows_its_final_length():
    ids = list(b"aaXbbXccY")
    parent = TextStop(compile_stop_patterns(("Y",), ("b+Xc",)), byte_decode, 0)
    assert feed_tokens(parent, ids[:5]) is None and parent.final_length() == 3  # "bb" may become "bbXc"
    child = parent.fork(ids[:4], 4)
    assert child.text == "aaXb" and child.final_length() == 3
    branch = list(b"aaXbab")
    assert not child.step(branch[:5]) and child.final_length() == 5
    assert not child.step(branch) and child.final_length() == 5
    assert not child.step(branch + list(b"X")) and child.final_length() == 5
    assert child.step(branch + list(b"Xc")) and child.matched == "bXc" and child.output_text(False) == "aaXba"
