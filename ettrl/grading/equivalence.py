"""Answer equivalence and grouping.

Order of checks: canonical keys (exact, no sympy) -> shape guards -> math-verify's LaTeX parser -> cheap
numeric verdicts on the parsed objects -> math-verify's verify; parse and verify run under one time bound.
Model strings are never given to eval/sympify/parse_expr: math-verify is used with its LaTeX extractor
only, which builds sympy objects from a grammar.
"""
import logging
from fractions import Fraction
from functools import lru_cache

from ettrl.grading.bounded import WORKER, can_use_alarm, run_with_alarm
from ettrl.grading.guards import too_hostile_for_sympy
from ettrl.grading.normalize import is_exact_kind, key_of_normalized, normalize_answer
from ettrl.grading.numeric import numeric_verdict

DEFAULT_TIMEOUT_S = 1.0
_WORKER_MARGIN_S = 1.0  # IPC slack on top of the worker's own alarm
_TIMED_OUT: set[tuple[str, str]] = set()  # pairs whose comparison overran once: never retried


def is_equivalent(a: str | None, b: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether two extracted answers are mathematically equivalent. None is never equivalent to anything.

    Symmetric. Returns False on timeout, parse failure or hostile input (see guards.py).
    """
    if a is None or b is None:
        return False
    na, nb = normalize_answer(_as_text(a)), normalize_answer(_as_text(b))
    return _normalized_equivalent(na, key_of_normalized(na), nb, key_of_normalized(nb), timeout_s)


def _as_text(answer) -> str:
    """Answers are strings; plain numbers (a dataset's integer gold answer) are accepted as their str()."""
    if isinstance(answer, str):
        return answer
    if isinstance(answer, (int, float, Fraction)) and not isinstance(answer, bool):
        return str(answer)
    raise TypeError(f"an answer must be a str (or None), got {type(answer).__name__}: {answer!r}")


def _normalized_equivalent(na: str, ka: tuple, nb: str, kb: tuple, timeout_s: float) -> bool:
    if ka == kb:
        return True
    if ka[0] == kb[0] and is_exact_kind(ka):
        return False  # two exact numbers (or tuples/sets of them) that differ
    return symbolic_equal(na, nb, timeout_s)


def group_answers(answers: list[str | None], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[int]:
    """Equivalence-class id per answer: 0, 1, ... in order of first appearance; -1 for None.

    Answers are first bucketed by canonical key (one dict lookup each); only the buckets' representatives are
    compared symbolically, each against the first member of every class found so far (first match wins).
    """
    bucket_of_answer: dict[str, int] = {}
    bucket_keys: dict[tuple, int] = {}
    buckets: list[tuple[str, tuple]] = []  # (normal form, key) of each bucket's first answer
    answer_bucket = []
    for answer in answers:
        if answer is None:
            answer_bucket.append(-1)
            continue
        text = _as_text(answer)
        if text not in bucket_of_answer:
            normal = normalize_answer(text)
            key = key_of_normalized(normal)
            if key not in bucket_keys:
                bucket_keys[key] = len(buckets)
                buckets.append((normal, key))
            bucket_of_answer[text] = bucket_keys[key]
        answer_bucket.append(bucket_of_answer[text])
    bucket_class = _merge_buckets(buckets, timeout_s)
    return [-1 if b < 0 else bucket_class[b] for b in answer_bucket]


def _merge_buckets(buckets: list[tuple[str, tuple]], timeout_s: float) -> list[int]:
    class_heads: list[tuple[str, tuple]] = []
    bucket_class = []
    for normal, key in buckets:
        for class_id, (head_normal, head_key) in enumerate(class_heads):
            if _normalized_equivalent(normal, key, head_normal, head_key, timeout_s):
                bucket_class.append(class_id)
                break
        else:
            bucket_class.append(len(class_heads))
            class_heads.append((normal, key))
    return bucket_class


def symbolic_equal(a: str, b: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """math-verify equivalence of two normalised answers (either direction); parse and verify together are
    bounded by `timeout_s`. A pair that overran once is not tried again."""
    if a == b:
        return True
    pair = (a, b) if a < b else (b, a)
    if too_hostile_for_sympy(a) or too_hostile_for_sympy(b) or pair in _TIMED_OUT:
        return False
    if not can_use_alarm():
        return bool(WORKER.call((a, b, timeout_s), timeout_s + _WORKER_MARGIN_S, default=False))
    _math_verify()  # imports and grammar loading are not counted against the comparison's bound
    result = run_with_alarm(_parse_and_verify, (a, b), timeout_s, default=None)
    if result is None:
        if len(_TIMED_OUT) > 100_000:
            _TIMED_OUT.clear()
        _TIMED_OUT.add(pair)
    return bool(result)


def _parse_and_verify(a: str, b: str) -> bool:
    parsed_a, parsed_b = _parse(a), _parse(b)
    return bool(parsed_a and parsed_b and _verify_either_way(parsed_a, parsed_b))


@lru_cache(maxsize=8192)
def _parse(text: str) -> tuple:
    """math-verify's parse of one answer with the LaTeX extractor only (never ExprExtractionConfig: it
    calls sympy's parse_expr, which evaluates Python)."""
    math_verify = _math_verify()
    try:
        parsed = math_verify.parse("\\boxed{" + text + "}", extraction_config=[math_verify.LatexExtractionConfig()],
                                   parsing_timeout=None)
    except Exception:
        return ()
    return tuple(parsed)


def _verify_either_way(a: tuple, b: tuple) -> bool:
    math_verify = _math_verify()
    try:
        verdict = numeric_verdict(a[0], b[0])
        if verdict is not None:
            return verdict
        return math_verify.verify(list(a), list(b), timeout_seconds=None) or \
            math_verify.verify(list(b), list(a), timeout_seconds=None)
    except Exception:
        return False


@lru_cache(maxsize=1)
def _math_verify():
    import math_verify
    from math_verify import grader, parser

    # Timeouts are ours (bounded.py); silence math-verify's one-time "timeout disabled" warning.
    parser.TIMEOUT_WARNING_SHOWN = grader.TIMEOUT_WARNING_SHOWN = True
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    warm = [math_verify.parse(text, extraction_config=[math_verify.LatexExtractionConfig()], parsing_timeout=None)
            for text in ("\\boxed{(x+1)^2}", "\\boxed{x^2+2x+1}", "\\boxed{(1,\\frac{1}{2})}", "\\boxed{\\{1\\}}")]
    math_verify.verify(warm[0], warm[1], timeout_seconds=None)  # loads sympy's simplify machinery
    return math_verify
