"""TTRL's answer extraction, reproduced for `rollout.vote=ttrl` (docs/algorithms.md section 1).

TTRL (PRIME-RL/TTRL, verl/verl/utils/reward_score/ttrl/qwen/qwen_math_parser.py, `extract_answer(pred_str,
"math")` and `strip_string`, adapted there from Qwen2.5-Math's evaluation parser) turns every response into a
string, truncated or not: the minerva "final answer is $...$. I hope" phrase, else the text after the last
"boxed" (brace-counted, closed or not), else the text after the last "he answer is" / "final answer is", else
the last number, else "". The string is then normalised by rules written for MATH answers (units, word numbers,
`\\frac12`, `a/b`) and compared as a string: "0.5" and "\\frac{1}{2}" stay two answers.

This module reproduces that behaviour rule for rule, quirks included (a bare "a" or "m" is a unit and goes; "and"
is deleted inside words; a sentence with number words becomes a number), because the point of the option is to
vote exactly as TTRL does. Each rule is a linear scan or a regex without nested quantifiers.
"""
from __future__ import annotations

import re
from functools import lru_cache

# qwen_math_parser.unit_texts, in its order (removal is sequential), then each with an "s"; each is a regex
UNIT_TEXTS = (
    "east", "degree", "mph", "kmph", "ft", "m sqaure", " m east", "sq m", "deg", "mile", "q .", "monkey", "prime",
    "ratio", "profit of rs", "rd", "o", "gm", "p . m", "lb", "tile", "per", "dm", "lt", "gain", "ab", "way", "west",
    "a .", "b .", "c .", "d .", "e .", "f .", "g .", "h .", "t", "a", "h", "no change", "men", "soldier", "pie", "bc",
    "excess", "st", "inches", "noon", "percent", "by", "gal", "kmh", "c", "acre", "rise", "a . m", "th", "π r 2",
    "sq", "mark", "l", "toy", "coin", "sq . m", "gallon", "° f", "profit", "minw", "yr", "women", "feet", "am", "pm",
    "hr", "cu cm", "square", "v â € ™", "are", "rupee", "rounds", "cubic", "cc", "mtr", "s", "ohm", "number", "kmph",
    "day", "hour", "minute", "min", "second", "man", "woman", "sec", "cube", "mt", "sq inch", "mp", "∏ cm ³",
    "hectare", "more", "sec", "unit", "cu . m", "cm 2", "rs .", "rs", "kg", "g", "month", "km", "m", "cm", "mm",
    "apple", "liter", "loss", "yard", "pure", "year", "increase", "decrease", "d", "less", "Surface", "litre",
    "pi sq m", "s .", "metre", "meter", "inch",
)
# (pattern, a literal the text must hold for it to match: the unit itself unless it has a regex "." in it)
_UNITS = [(re.compile(r"(^|\W)" + u + r"($|\W)"), None if "." in u else u)
          for u in UNIT_TEXTS + tuple(u + "s" for u in UNIT_TEXTS)]
_LAST_NUMBER = re.compile(r"-?\d*\.?\d+")
_ARRAY_BEGIN = re.compile(r"\\begin\{array\}\{.*?\}")
_TRAILING_TEXT = re.compile(r"\\text\{.*?\}$")
_TEXT = re.compile(r"\\text\{(.*?)\}")
_MBOX = re.compile(r"\\mbox\{.*?\}")
# TTRL writes (\d+) here; one digit gives the same result and cannot go quadratic on a long run of digits
_ZEROS_BEFORE = re.compile(r"(\d)\.0*([^\d])")
_ZEROS_AT_END = re.compile(r"(\d)\.0*$")
_SQRT_WORD = re.compile(r"\\sqrt(\w+)")
_VARIABLE_PREFIXES = ("x=", "y=", "z=", "x\\in", "y\\in", "z\\in", "x\\to", "y\\to", "z\\to")


def ttrl_answer(text: str) -> str:
    """TTRL's answer string for a response (`extract_answer(text, "math")`); "" when nothing is found."""
    text = text.replace("\u043a\u0438", "")
    if "final answer is $" in text and "$. I hope" in text:
        pred = text.split("final answer is $", 1)[1].split("$. I hope", 1)[0].strip()
    elif "boxed" in text:
        pred = _after_box(text.split("boxed")[-1])
    elif "he answer is" in text:
        pred = text.split("he answer is")[-1].strip()
    elif "final answer is" in text:
        pred = text.split("final answer is")[-1].strip()
    elif "答案是" in text:
        pred = text.split("答案是")[1].strip().split("\n\n")[0].strip()
    else:
        numbers = _LAST_NUMBER.findall(text.replace(",", ""))
        pred = numbers[-1] if numbers else ""
    pred = re.sub(r"\n\s*", "", pred)
    for edge, at_start in ((":", True), (".", False), ("/", False)):
        if pred and (pred[0] if at_start else pred[-1]) == edge:
            pred = pred[1:] if at_start else pred[:-1]
    return ttrl_normalize(pred)


def _after_box(rest: str) -> str:
    """What follows the last "boxed": a brace group counted without escapes (an unclosed one gives what was
    written), or up to the next "$"."""
    if not rest:
        return ""
    if rest[0] != "{":
        return rest.split("$")[0].strip()
    depth = 1
    for i in range(1, len(rest)):
        if rest[i] == "{":
            depth += 1
        elif rest[i] == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return rest[1:]


@lru_cache(maxsize=16384)
def ttrl_normalize(s: str) -> str:
    """TTRL's `strip_string(s, skip_unit=False)`, step by step."""
    s = str(s).strip().replace("\n", "").rstrip(".").replace("\\!", "")
    s = _ARRAY_BEGIN.sub(r"\\begin{pmatrix}", s).replace("\\end{array}", "\\end{pmatrix}").replace("bmatrix", "pmatrix")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\{", "{").replace("\\}", "}")
    s = _keep_if_nonempty(_TRAILING_TEXT.sub("", s).strip(), s)
    for _ in range(2):
        for unit, literal in _UNITS:
            if literal is None or literal in s:
                s = _keep_if_nonempty(unit.sub(r"\1\2", s), s)
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\(", "").replace("\\)", "")
    s = _word_number(s)
    s = _TEXT.sub(r"\1", s)
    for prefix in _VARIABLE_PREFIXES:
        s = s.replace(prefix, "")
    s = s.replace("\\emptyset", "{}").replace("(-\\infty,\\infty)", "\\mathbb{R}")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    # (TTRL's unwrapping of "{x}" / "(x)" / "[x]" tests isalnum() on the bracketed string: it never applies)
    s = s.replace("infinity", "\\infty")
    if "\\infty" not in s:
        s = s.replace("inf", "\\infty")
    s = s.replace("+\\inity", "\\infty").replace("and", "").replace("\\mathbf", "")
    s = _MBOX.sub("", s)
    if "j" in s and "i" not in s:
        s = s.replace("j", "i")
    s = _ZEROS_AT_END.sub(r"\1", _ZEROS_BEFORE.sub(r"\1\2", s))
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    s = _SQRT_WORD.sub(r"\\sqrt{\1}", s).replace(" ", "")
    return _slash_to_frac(_brace_fracs(s))


def _keep_if_nonempty(new: str, old: str) -> str:
    return new if new != "" else old


def _brace_fracs(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{72}` -> `\\frac{1}{72}`; a `\\frac` followed by fewer than two
    characters leaves the whole string as it was."""
    head, *parts = s.split("\\frac")
    out = [head]
    for part in parts:
        out.append("\\frac")
        if part[:1] == "{":
            out.append(part)
        elif len(part) < 2:
            return s
        elif part[1] != "{":
            out.append("{" + part[0] + "}{" + part[1] + "}" + part[2:])
        else:
            out.append("{" + part[0] + "}" + part[1:])
    return "".join(out)


def _slash_to_frac(s: str) -> str:
    """`3/4` -> `\\frac{3}{4}` when both sides are integers written plainly (or hold "sqrt")."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = (p if "sqrt" in p else int(p) for p in parts)
    except ValueError:
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if s == f"{a}/{b}" else s


# word2number 1.1 as released on PyPI (`w2n.word_to_num`), which TTRL's `convert_word_number` calls on the whole answer
_WORD_VALUES = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_WORD_VALUES.update({w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety"
                                                                 .split())})
_WORD_VALUES.update(hundred=100, thousand=1000, million=10**6, billion=10**9)
_SCALES = ("billion", "million", "thousand")


def _word_number(s: str) -> str:
    """The number a text spells ("twenty five" -> "25", "007" -> "7"), or the text itself when word2number
    refuses it (no number word, a repeated scale word, scales out of order, ...)."""
    try:
        value = _words_to_value(s)
    except (ValueError, IndexError):
        return s
    return str(value)


def _words_to_value(sentence: str) -> int | float:
    sentence = sentence.replace("-", " ").lower()
    if sentence.isdigit():
        return int(sentence)
    words = [w for w in sentence.split() if w in _WORD_VALUES or w == "point"]
    if not words:
        raise ValueError("no number words")
    if any(words.count(w) > 1 for w in (*_SCALES, "point")):
        raise ValueError("a repeated scale word")
    decimals = []
    if "point" in words:
        cut = words.index("point")
        words, decimals = words[:cut], words[cut + 1:]
    at = {w: words.index(w) if w in words else -1 for w in _SCALES}
    b, m, t = at["billion"], at["million"], at["thousand"]
    if (t > -1 and (t < m or t < b)) or (m > -1 and m < b):
        raise ValueError("scales out of order")
    total: int | float = _integer_part(words, b, m, t) if words else 0
    if decimals:
        total += _decimal_part(decimals)
    return total


def _integer_part(words: list[str], b: int, m: int, t: int) -> int:
    if len(words) == 1:
        return _WORD_VALUES[words[0]]
    total = 0
    if b > -1:
        total += _group(words[:b]) * 10**9
    if m > -1:
        total += _group(words[b + 1:m] if b > -1 else words[:m]) * 10**6
    if t > -1:
        total += _group(words[m + 1:t] if m > -1 else words[b + 1:t] if b > -1 else words[:t]) * 1000
    last = len(words) - 1
    if t > -1 and t != last:
        total += _group(words[t + 1:])
    elif m > -1 and m != last:
        total += _group(words[m + 1:])
    elif b > -1 and b != last:
        total += _group(words[b + 1:])
    elif t == m == b == -1:
        total += _group(words)
    return total


def _group(words: list[str]) -> int:
    """word2number's `number_formation`: "two hundred five" = 2 * 100 + 5; more than four words: the first."""
    n = [_WORD_VALUES[w] for w in words]
    if len(n) == 4:
        return n[0] * n[1] + n[2] + n[3]
    if len(n) == 3:
        return n[0] * n[1] + n[2]
    if len(n) == 2:
        return n[0] * n[1] if 100 in n else n[0] + n[1]
    return n[0]


def _decimal_part(words: list[str]) -> float | int:
    digits = "zero one two three four five six seven eight nine".split()
    if any(w not in digits for w in words):
        return 0
    return float("0." + "".join(str(digits.index(w)) for w in words))
