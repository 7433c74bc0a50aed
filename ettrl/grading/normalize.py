"""String normalisation and canonical keys: the fast path that settles most comparisons without sympy.

`canonical_key` maps an answer to a hashable key. Equal keys mean equivalent answers. Two keys of the same
exact kind ("num", "tuple", "set": exact rationals; "text": a word) that differ mean "not equivalent" without
further work; everything else is left to the symbolic check in `equivalence.py`.

Decisions: a percent sign and a degree sign are dropped ("50\\%" == "50", "30^\\circ" == "30"); a trailing
unit in \\text{}/\\mbox{} is dropped; "137 \\frac{1}{2}" is the mixed number 275/2; "1,000" is one thousand;
a bare comma list "-2,1" is a set of solutions; "x = 5" equals "5"; decimals are exact ("0.333" != "1/3");
a base subscript is dropped and the digits kept as written ("2516_8" == "2516", != "1358").
"""
import re
from fractions import Fraction

MAX_ANSWER_CHARS = 1000  # longer answers are compared as raw strings only
MAX_NUMBER_DIGITS = 400

_DELETE = ["\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad",
           "\\$", "$", "^\\circ", "^{\\circ}", "^\\degree", "^{\\degree}", "\\circ", "\\degree", "°",
           "\\%", "%", "\\bigl", "\\bigr", "\\Bigl", "\\Bigr"]
_RENAME = [("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\le ", "\\leq "), ("\\ge ", "\\geq "),
           ("\\lbrace", "\\{"), ("\\rbrace", "\\}")]
_ESCAPED_SPACE = re.compile(r"(?<!\\)\\ ")  # "\ " but not a row break "\\" before a space
_BASE_SUBSCRIPT = re.compile(r"^(\d+)_\{?\d+\}?$")
_WRAPPER = r"\\(?:text|textbf|textit|mbox|mathrm|mathbf|operatorname)\s*"
_TRAILING_UNIT = re.compile(_WRAPPER + r"\{\s*[A-Za-z][A-Za-z .]*\}\s*(?:\^\s*\{?\s*[23]\s*\}?)?\s*$")
_UNIT_WORDS = ("square units", "sq units", "units", "unit", "degrees", "degree", "dollars", "cents",
               "inches", "inch", "feet", "foot", "meters", "cm", "mm", "km", "mph", "hours", "minutes",
               "seconds", "days", "square feet", "sq ft", "cubic units")
_TRAILING_UNIT_WORD = re.compile(r"(?<=[\d}])\s+(?:" + "|".join(_UNIT_WORDS) + r")\s*(?:\^\s*\{?[23]\}?)?\s*$")
_UNWRAP = re.compile(_WRAPPER + r"\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\frac\s*(\d)\s*(\d)")          # \frac12 -> \frac{1}{2}
_FRAC_HALF_SHORT = re.compile(r"\\frac\s*(\{[^{}]*\})\s*(\d)")  # \frac{270}7
_FRAC_SHORT_NUM = re.compile(r"\\frac\s*(\d)\s*(\{)")       # \frac9{19}
_SQRT_SHORT = re.compile(r"\\sqrt\s*(\d|[a-zA-Z](?![a-zA-Z]))")
_ASSIGNMENT = re.compile(r"^[a-zA-Z](?:_\{?\d\}?)?=(?!=)")
_CHOICE = re.compile(r"^\(([A-J])\)$")

_INT = re.compile(r"-?\d+")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+")
_DECIMAL = re.compile(r"-?(?:\d+\.\d*|\.\d+)")
_FRAC = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")
_SLASH = re.compile(r"(-?\d+)/(-?\d+)")
_MIXED = re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")


def normalize_answer(answer: str) -> str:
    """A whitespace-free normal form of a LaTeX answer string (see the module docstring for the rules)."""
    s = answer.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return "".join(s.split())
    for old, new in _RENAME:
        s = s.replace(old, new)
    s = _ESCAPED_SPACE.sub(" ", s)
    for token in _DELETE:
        s = s.replace(token, "")
    s = _strip_units(s)
    s = _UNWRAP.sub(r"\1", _UNWRAP.sub(r"\1", s))
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_SHORT_NUM.sub(r"\\frac{\1}\2", s)
    s = _FRAC_HALF_SHORT.sub(r"\\frac\1{\2}", s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    s = "".join(s.split()).rstrip(".").strip()
    s = _BASE_SUBSCRIPT.sub(r"\1", s)
    if _is_text_answer(s):
        s = s.lower()
    choice = _CHOICE.match(s)
    return choice.group(1) if choice else s


def _strip_units(s: str) -> str:
    stripped = _TRAILING_UNIT.sub("", s).strip()
    if stripped and stripped != s:
        s = stripped
    stripped = _TRAILING_UNIT_WORD.sub("", s).strip()
    return stripped or s


def _is_text_answer(s: str) -> bool:
    """A word answer such as "east" or "Navin": compared case-insensitively and only as a word (sympy would
    read "Evelyn" as the product E*v*e*l*y*n and find it equal to "Nevely")."""
    return len(s) >= 3 and s.isalpha() and s.isascii()


def canonical_key(answer: str) -> tuple:
    """A hashable key: ("num", Fraction), ("tuple", values), ("set", values), ("text", word) or
    ("str", normal form)."""
    return key_of_normalized(normalize_answer(answer))


def key_of_normalized(s: str) -> tuple:
    if len(s) > MAX_ANSWER_CHARS:
        return ("str", s)
    if _is_text_answer(s):
        return ("text", s)
    value = parse_number(_ASSIGNMENT.sub("", s, count=1))
    if value is not None:
        return ("num", value)
    for kind, inner in (("tuple", _strip_pair(s, "(", ")")), ("set", _strip_pair(s, "\\{", "\\}")),
                        ("set", s if "," in s and not _THOUSANDS.fullmatch(s) else None)):
        if inner is None:
            continue
        parts = split_top_level(inner)
        values = [parse_number(p) for p in parts]
        if len(parts) > 1 and all(v is not None for v in values):
            return (kind, tuple(values)) if kind == "tuple" else (kind, tuple(sorted(set(values))))
    return ("str", s)


def parse_number(s: str) -> Fraction | None:
    """The exact value of an integer, decimal, fraction or mixed-number string; None for anything else."""
    if not s or len(s) > MAX_NUMBER_DIGITS:
        return None
    if _INT.fullmatch(s) or _DECIMAL.fullmatch(s):
        return Fraction(s)
    if _THOUSANDS.fullmatch(s):
        return Fraction(s.replace(",", ""))
    if m := _FRAC.fullmatch(s):
        return _ratio(m.group(2), m.group(3), negative=bool(m.group(1)))
    if m := _SLASH.fullmatch(s):
        return _ratio(m.group(1), m.group(2), negative=False)
    if m := _MIXED.fullmatch(s):
        whole, num, den = int(m.group(2)), int(m.group(3)), int(m.group(4))
        if den == 0 or num >= den:
            return None  # "2\frac{3}{2}" is not a mixed number; leave it to the symbolic check
        value = whole + Fraction(num, den)
        return -value if m.group(1) else value
    return None


def _ratio(num: str, den: str, negative: bool) -> Fraction | None:
    if int(den) == 0:
        return None
    value = Fraction(int(num), int(den))
    return -value if negative else value


def _strip_pair(s: str, left: str, right: str) -> str | None:
    if s.startswith(left) and s.endswith(right) and len(s) > len(left) + len(right):
        return s[len(left):-len(right)]
    return None


def split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside (), [], {}."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


def is_exact_kind(key: tuple) -> bool:
    return key[0] in ("num", "tuple", "set", "text")
