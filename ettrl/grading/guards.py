"""Cheap shape checks that keep hostile strings away from sympy.

A signal can interrupt Python code but not one long C call (a 10^10^10 big-int power, a huge factorial),
so such shapes must never reach the parser. These checks are linear scans.
"""
import re

MAX_SYMBOLIC_CHARS = 400
MAX_BRACE_DEPTH = 12
MAX_EXPONENT = 10_000
MAX_NESTED_EXPONENT = 100  # outer exponent allowed on a base that has its own power
MAX_FACTORIAL = 1_000
_FACTORIAL_OF_LITERAL = re.compile(r"(\d+)\s*!")


def too_hostile_for_sympy(s: str) -> bool:
    """True when `s` could make sympy run long in C code, blow the parser's stack, or break out of the
    \\boxed{...} the parser receives."""
    if len(s) > MAX_SYMBOLIC_CHARS or _brace_depth(s) > MAX_BRACE_DEPTH or not _curly_balanced(s):
        return True
    return _has_huge_power(s) or _has_huge_factorial(s)


def _brace_depth(s: str) -> int:
    depth = deepest = 0
    for ch in s:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]":
            depth -= 1
    return deepest


def _curly_balanced(s: str) -> bool:
    """Unbalanced braces could close the \\boxed{...} wrapper handed to the parser and smuggle in another."""
    depth = 0
    for ch in s:
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return False
    return depth == 0


def _has_huge_power(s: str) -> bool:
    """A power tower (an exponent that has its own exponent) or a literal exponent above MAX_EXPONENT."""
    compact = "".join(s.split()).replace("**", "^")
    pos = compact.find("^")
    while pos >= 0:
        exponent, end = _operand(compact, pos + 1)
        if "^" in exponent or compact.startswith("^", end) or "!" in exponent:
            return True
        digits = exponent.strip("{}()-+")
        small = digits.isdigit() and len(digits) <= 6 and int(digits) <= MAX_NESTED_EXPONENT
        if digits.isdigit() and (len(digits) > 6 or int(digits) > MAX_EXPONENT):
            return True
        if not small and "^" in _group_before(compact, pos):
            return True  # (10^{9999})^{9999}: a power of a power
        pos = compact.find("^", pos + 1)
    return False


def _group_before(s: str, pos: int) -> str:
    """The (...) or {...} group that ends right before s[pos], or "" if s[pos - 1] closes none."""
    if pos == 0 or s[pos - 1] not in ")}":
        return ""
    depth = 0
    for i in range(pos - 1, -1, -1):
        depth += (s[i] in ")}") - (s[i] in "({")
        if depth == 0:
            return s[i:pos]
    return s[:pos]


def _operand(s: str, start: int) -> tuple[str, int]:
    """The exponent operand at s[start:]: a balanced {...}/(...) group, else a run of digits, else one char."""
    if start >= len(s):
        return "", start
    if s[start] in "{(":
        close = "}" if s[start] == "{" else ")"
        depth = 0
        for i in range(start, len(s)):
            if s[i] in "{(":
                depth += 1
            elif s[i] in "})":
                depth -= 1
                if depth == 0 and s[i] == close:
                    return s[start:i + 1], i + 1
        return s[start:], len(s)
    end = start
    while end < len(s) and s[end].isdigit():
        end += 1
    end = max(end, start + 1)
    return s[start:end], end


def _has_huge_factorial(s: str) -> bool:
    """Factorials, binomials and Gamma of anything but a small literal can be arbitrarily large ints."""
    if s.count("!") > 3 or re.search(r"[^\d\s]\s*!", s):
        return True
    if ("\\binom" in s or "\\Gamma" in s or "\\choose" in s) and ("^" in s or "!" in s):
        return True
    return any(len(m) > 4 or int(m) > MAX_FACTORIAL for m in _FACTORIAL_OF_LITERAL.findall(s))
