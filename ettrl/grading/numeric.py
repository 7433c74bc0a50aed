"""Cheap numeric decisions on parsed (sympy) answers, taken before math-verify's simplify and set algebra.

math-verify's verify is slow (simplify, set symmetric differences; docs/benchmarks.md); grouping 64 answers may
need hundreds of pairs. Evaluating each parsed answer once (cached) settles most of them.
"""
from __future__ import annotations

import cmath
from functools import lru_cache
from typing import Any

_PROBE_VALUES = (0.7071, 1.3183, 0.9273, 1.6180, 0.5772, 1.2021)
_REJECT_TOL = 1e-6  # relative; looser than math-verify's own float comparison, so never a false rejection
_ACCEPT_TOL = 1e-12


def numeric_verdict(a: Any, b: Any) -> bool | None:
    """A cheap decision before math-verify's simplify and set algebra, or None to ask math-verify.

    False: two plain expressions that differ at one point of their free symbols (assignments "y = f" count
    as f); two numeric intervals/unions/sets/tuples whose values differ; an expression and an interval or a
    collection of several values; an interval and a finite set or tuple other than its two endpoints.
    True: two numeric intervals/unions/sets/tuples whose values agree to 1e-12 (their set algebra in sympy
    is slow). Equations, matrices, symbolic sets and mixed kinds are left to math-verify."""
    from sympy import Expr, FiniteSet, Interval, Tuple, Union
    from sympy.core.relational import Relational

    # Assignments "y = f" compare by their right-hand side, as in math-verify, against "y = g" or a non-relation
    if _is_assignment(a) and _is_assignment(b) and a.lhs == b.lhs:
        a, b = a.rhs, b.rhs
    elif _is_assignment(a) and not isinstance(b, Relational):
        a = a.rhs
    elif _is_assignment(b) and not isinstance(a, Relational):
        b = b.rhs
    if isinstance(a, Expr) and isinstance(b, Expr):
        symbols = sorted(a.free_symbols | b.free_symbols, key=str)
        if len(symbols) > len(_PROBE_VALUES):
            return None
        point = tuple(zip(symbols, _PROBE_VALUES))
        va, vb = _value(a, point), _value(b, point)
        return False if va is not None and vb is not None and not _close(va, vb, _REJECT_TOL) else None
    if isinstance(b, Expr):
        a, b = b, a
    several = isinstance(b, (Interval, Union)) or (isinstance(b, (FiniteSet, Tuple)) and len(b.args) > 1)
    if isinstance(a, Expr) and several:
        return False  # one value is never an interval, nor a collection of several values
    if isinstance(b, Interval):
        a, b = b, a
    if isinstance(a, Interval) and isinstance(b, (FiniteSet, Tuple)) and not _is_endpoint_pair(a, b):
        return False  # math-verify may read "1,2" as "(1,2)", but no other finite set or tuple is an interval
    sa, sb = _signature(a), _signature(b)
    if sa is None or sb is None or sa[0] != sb[0]:
        return None
    if _same_signature(sa, sb, _ACCEPT_TOL):
        return True
    return False if not _same_signature(sa, sb, _REJECT_TOL) else None


def _is_assignment(expr) -> bool:
    from sympy import Eq, Symbol

    return isinstance(expr, Eq) and isinstance(expr.lhs, Symbol) and expr.lhs not in expr.rhs.free_symbols


def _is_endpoint_pair(interval, finite) -> bool:
    """Whether `finite` holds just the interval's two ends (values that do not evaluate count as "maybe")."""
    if len(finite.args) != 2:
        return False
    maybe = [_value(x) for x in (interval.start, interval.end, *finite.args)]
    values = [v for v in maybe if v is not None]
    if len(values) < len(maybe):
        return True
    ends, elements = sorted(values[:2], key=_real), sorted(values[2:], key=_real)
    return all(_close(x, y, _REJECT_TOL) for x, y in zip(ends, elements))


def _real(z: complex) -> float:
    return z.real


@lru_cache(maxsize=65536)
def _value(expr, point: tuple = ()) -> complex | None:
    """Numeric value of `expr` with symbols set by `point` ((symbol, value) pairs); cached per parsed answer."""
    try:
        z = complex(expr.evalf(15, subs=dict(point)) if point else expr.evalf(15))
    except (TypeError, ValueError, ArithmeticError):
        return None
    return z if z == z else None  # NaN: no information


def _close(x: complex, y: complex, tol: float) -> bool:
    if cmath.isinf(x) or cmath.isinf(y):
        return x == y
    return abs(x - y) <= tol * max(1.0, abs(x), abs(y))


def _signature(obj):
    """("n", value) for a number; ("U", intervals...) for an interval or a union of intervals, merged into
    canonical form; ("S"|"T", ...) for finite sets and tuples of numbers; None for anything else."""
    from sympy import Expr, FiniteSet, Interval, Tuple, Union

    if isinstance(obj, Expr):
        value = _value(obj) if obj.is_number else None
        return None if value is None else ("n", value)
    if isinstance(obj, (Interval, Union)):
        intervals = _intervals(obj)
        return None if intervals is None else ("U", *_merge_intervals(intervals))
    tag = "S" if isinstance(obj, FiniteSet) else "T" if isinstance(obj, Tuple) else None
    parts: list[Any] = [_signature(arg) for arg in obj.args] if tag else [None]  # signature tuples, or None
    if None in parts:
        return None
    if tag == "S":
        parts.sort(key=lambda p: (p[0], p[1].real, p[1].imag) if p[0] == "n" else (p[0], 0.0, 0.0))
    return (tag, *parts)


def _intervals(obj) -> list[tuple] | None:
    """(lo, hi, lo_open, hi_open) with real float ends for an interval or a union of intervals."""
    from sympy import Interval

    members = [obj] if isinstance(obj, Interval) else list(obj.args)
    out = []
    for member in members:
        if not isinstance(member, Interval):
            return None
        lo, hi = _value(member.start), _value(member.end)
        if lo is None or hi is None or lo.imag or hi.imag:
            return None
        out.append((lo.real, hi.real, bool(member.left_open), bool(member.right_open)))
    return out


def _merge_intervals(intervals: list[tuple]) -> list[tuple]:
    """Sort and merge overlapping or touching intervals (an unevaluated union is not canonical)."""
    merged: list[tuple] = []
    for lo, hi, lo_open, hi_open in sorted(intervals, key=lambda i: (i[0], i[2])):
        if merged:
            m_lo, m_hi, m_lo_open, m_hi_open = merged[-1]
            if lo < m_hi or (lo == m_hi and not (lo_open and m_hi_open)):
                if hi > m_hi or (hi == m_hi and not hi_open):
                    m_hi, m_hi_open = hi, hi_open
                merged[-1] = (m_lo, m_hi, m_lo_open, m_hi_open)
                continue
        merged.append((lo, hi, lo_open, hi_open))
    return [("I", complex(lo), complex(hi), lo_open, hi_open) for lo, hi, lo_open, hi_open in merged]


def _same_signature(x, y, tol: float) -> bool:
    if isinstance(x, complex) or isinstance(y, complex):
        return isinstance(x, complex) and isinstance(y, complex) and _close(x, y, tol)
    if isinstance(x, tuple) and isinstance(y, tuple):
        return len(x) == len(y) and all(_same_signature(p, q, tol) for p, q in zip(x, y))
    return x == y
