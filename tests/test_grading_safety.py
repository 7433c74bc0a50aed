"""Grading never executes model text and never hangs: hostile boxed strings return within a small bound."""
import builtins
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ettrl.grading import equivalence, extract_answer, extract_choice, group_answers, is_equivalent

BOUND_S = 3.0  # generous wall-clock bound per call on a shared 2-core CI machine (comparison timeout: 1 s)
SLOW_BUT_LEGAL = ("(x+1)^{300}(x-1)^{300}", "(x^2-1)^{300}")  # equal; sympy needs ~20 s to say so


def _code_strings(sentinel):
    return [
        f"__import__('os').system('touch {sentinel}')",
        f"__import__(\"os\").system(\"touch {sentinel}\")",
        f"exec(\"open('{sentinel}', 'w').write('x')\")",
        f"eval(\"__import__('os').system('touch {sentinel}')\")",
        f"(lambda: __import__('os').system('touch {sentinel}'))()",
        f"Symbol('x').__class__.__init__.__globals__['os'].system('touch {sentinel}')",
        f"\\text{{__import__('os').system('touch {sentinel}')}}",
    ]


HOSTILE = [
    "10^10^10^10^10",
    "10^{10^{10^{10^{10}}}}",
    "2^{2^{2^{2^{2^{2}}}}}",
    "9^{9^{9}}",
    "10^{100000000}",
    "(10^{9999})^{9999}",
    "{10^{9999}}^{9999}",
    "\\sqrt{10^{9999}}^{x}",
    "(10^{10})!",
    "100000!",
    "((10!)!)!",
    "\\binom{10^{9}}{5\\cdot 10^{8}}",
    "\\Gamma(10^{12})",
    "{" * 10_000 + "1" + "}" * 10_000,
    "(" * 10_000 + "1" + ")" * 10_000,
    "{" * 10_000,
    "\\frac{" * 3000 + "1",
    "1" * 1_000_000,
    "x+" * 500_000 + "1",
    "\\sqrt{" * 5000 + "2" + "}" * 5000,
    "a" * 1_000_000,
]


def _timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


DANGEROUS = ["__import__", "system", "open(", "exec", "eval", "lambda", "pwned", "__class__", "__globals__"]


@pytest.fixture
def no_eval(monkeypatch):
    """Record (and refuse) any eval/exec/sympify/parse_expr of a string that contains model text: a dangerous
    name or a string the test adds to `watched`. (sympy and latex2sympy parse their own constant strings and
    grammar-matched digit tokens that way; those are not model text and pass through.)"""
    import sympy.parsing.sympy_parser as sympy_parser
    from math_verify import parser as mv_parser

    watched = list(DANGEROUS)
    calls = []

    def spy_on(name, original):
        def spy(source, *args, **kwargs):
            if isinstance(source, str) and any(word in source for word in watched):  # imports pass code objects
                calls.append((name, source[:80]))
                raise AssertionError(f"{name}({source[:40]!r}) called during grading")
            return original(source, *args, **kwargs)
        return spy

    sympify_module = sys.modules["sympy.core.sympify"]
    equivalence._math_verify()
    monkeypatch.setattr(sympy_parser, "parse_expr", spy_on("parse_expr", sympy_parser.parse_expr))
    monkeypatch.setattr(mv_parser, "parse_expr", spy_on("parse_expr", mv_parser.parse_expr))
    monkeypatch.setattr(sympify_module, "sympify", spy_on("sympify", sympify_module.sympify))
    monkeypatch.setattr(builtins, "eval", spy_on("eval", builtins.eval))
    monkeypatch.setattr(builtins, "exec", spy_on("exec", builtins.exec))
    equivalence._parse.cache_clear()
    yield watched, calls
    equivalence._parse.cache_clear()


def test_code_strings_are_never_executed(tmp_path, no_eval):
    watched, calls = no_eval
    sentinel = tmp_path / "pwned"
    for code in _code_strings(sentinel):
        text = f"The answer is \\boxed{{{code}}}."
        answer = extract_answer(text)
        assert answer == code
        for other in ("0", "1", code + " ", "\\frac{1}{2}", "x"):
            result, seconds = _timed(is_equivalent, answer, other)
            assert seconds < BOUND_S, (code, other, seconds)
        group_answers([answer, "0", answer, "x + 1"])
    assert not sentinel.exists()
    assert calls == []


def test_ordinary_grading_needs_no_eval(no_eval):
    """Symbolic comparisons work while the answers themselves are never handed to a string evaluator."""
    watched, calls = no_eval
    watched += ["sqrt", "x+1", "x^2", "x**2", "\\frac"]
    assert is_equivalent("2\\sqrt{3}", "\\sqrt{12}")
    assert is_equivalent("(x+1)^2", "x^2+2x+1")
    assert not is_equivalent("\\frac{x}{2}", "x^2")
    assert calls == []


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda s: f"{s[:24]}..({len(s)} chars)")
def test_hostile_answers_return_quickly(hostile):
    text = "Some reasoning. \\boxed{" + hostile + "}"
    answer, seconds = _timed(extract_answer, text)
    assert seconds < BOUND_S
    for other in ("1", "10", hostile[:50], "x"):
        result, seconds = _timed(is_equivalent, hostile, other)
        assert seconds < BOUND_S, (other, seconds)
        assert result is False or other == hostile
    _, seconds = _timed(group_answers, [hostile, "1", hostile, "2", "x^2"])
    assert seconds < 2 * BOUND_S


def test_identical_hostile_strings_are_equal_without_parsing():
    big = "x+" * 500_000 + "1"
    result, seconds = _timed(is_equivalent, big, big)
    assert result and seconds < BOUND_S
    assert group_answers([big, big, "1"]) == [0, 0, 1]


def test_megabyte_responses_extract_quickly():
    cases = [
        ("x" * 1_000_000, None),
        ("\\boxed{" * 100_000, None),
        ("{" * 500_000 + "\\boxed{7}" + "}" * 500_000, "7"),
        ("\\boxed{1}" * 100_000, "1"),
        ("\\boxed{" + "{" * 10_000 + "5" + "}" * 10_000 + "}", "{" * 10_000 + "5" + "}" * 10_000),
        ("answer is " + " " * 1_000_000 + "B", None),
    ]
    for text, expected in cases:
        answer, seconds = _timed(extract_answer, text)
        assert answer == expected
        assert seconds < BOUND_S
        _, seconds = _timed(extract_choice, text)
        assert seconds < BOUND_S


def test_slow_legal_comparison_is_cut_at_the_timeout():
    equivalence._math_verify()
    result, seconds = _timed(is_equivalent, *SLOW_BUT_LEGAL, 0.5)
    assert result is False and seconds < 0.5 + 1.0
    result, seconds = _timed(is_equivalent, *SLOW_BUT_LEGAL, 0.5)  # remembered: no second attempt
    assert result is False and seconds < 0.1


def test_timeout_is_enforced_off_the_main_thread():
    """Worker-process path: the comparison overruns, the helper is killed, the next call still works."""
    out = {}

    def work():
        out["slow"] = _timed(is_equivalent, SLOW_BUT_LEGAL[1], SLOW_BUT_LEGAL[0], 0.5)
        out["after"] = is_equivalent("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")

    is_equivalent("1", "1")  # import on the main thread, so the worker start-up is the only extra cost
    warm = threading.Thread(target=lambda: out.setdefault("warm", is_equivalent("\\sqrt{4}", "2")))
    warm.start()
    warm.join(timeout=120)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=120)
    result, seconds = out["slow"]
    assert out["warm"] is True
    assert result is False and seconds < 0.5 + 2.0
    assert out["after"] is True


def test_callers_own_alarm_survives_a_bounded_comparison():
    import signal

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert is_equivalent("2\\sqrt{3}", "\\sqrt{12}")
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < remaining < 30.0
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        time.sleep(0.1)
        assert fired == [True]  # the caller's handler is back in place
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_unbalanced_braces_cannot_smuggle_a_second_box():
    assert not is_equivalent("7}\\boxed{5", "5")
    assert not is_equivalent("}{", "x")


LATEX_TOKENS = ["\\frac", "{", "}", "^", "10", "9", "x", "(", ")", "!", "\\sqrt", ",", "\\pi", "+", "-", "\\cdot",
                "\\boxed", "\\text", "\\{", "\\}", "[", "]", "\\infty", "\\cup", "=", ".", "%", "_", "\\binom", " "]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from(LATEX_TOKENS), max_size=40), st.lists(st.sampled_from(LATEX_TOKENS), max_size=40))
def test_random_latex_never_raises_or_hangs(left, right):
    equivalence._math_verify()  # one-time import and warm-up are outside the per-comparison bound
    a, b = "".join(left), "".join(right)
    for text in (a, "\\boxed{" + a + "}", "\\boxed " + a):
        extract_answer(text)
        extract_choice(text)
    result, seconds = _timed(is_equivalent, a, b, 0.3)
    assert isinstance(result, bool) and seconds < 0.3 + BOUND_S
    assert is_equivalent(a, a) or not a.strip()
