"""Answer extraction: the content of the last \\boxed{...} (or \\fbox{...}) and multiple-choice letters.

Everything here is a linear scan over the text: no regex that can backtrack, no recursion, so a 1 MB
response or 10,000 nested braces cost milliseconds.
"""
import re

BOX_COMMANDS = ("\\boxed", "\\fbox")
_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _brace_group(depth: int) -> str:
    """A regex for "{...}" whose content nests at most `depth` more brace groups; a backslash and the character
    after it are one atom, so an escaped brace never counts (as in `_balanced_group`)."""
    inner = r"\\.|[^{}\\]" + ("|" + _brace_group(depth - 1) if depth else "")
    return r"\{(?:" + inner + r")*\}"


# The first complete \boxed{...} with up to three levels of braces inside (\boxed{\frac{1}{\sqrt{2}}} uses two):
# the stop pattern of rollout.stop_at_answer. Written in the engine's regex dialect (no recursion, no lookaround);
# deeper nesting never matches, so such a response runs on rather than being cut inside its answer.
BOXED_ANSWER_REGEX = r"\\boxed" + _brace_group(3)


def extract_answer(text: str | None, last_number_fallback: bool = False) -> str | None:
    """The content of the last \\boxed{...}/\\fbox{...} in `text` (balanced braces), or None.

    `\\boxed 5` (no braces) gives the next token. A last box that never closes (a response truncated at the
    length limit) gives None, as does an empty box. `last_number_fallback` returns the last number in
    the text when there is no box (off by default: truncated responses would vote with noise).
    """
    if not text:
        return None
    start, command = max((text.rfind(c), c) for c in BOX_COMMANDS)
    if start < 0:
        return _last_number(text) if last_number_fallback else None
    rest = start + len(command)
    if text.startswith("{", rest):
        content = _balanced_group(text, rest)
    elif text.startswith(" ", rest):
        content = _bare_token(text, rest)
    else:
        return None  # e.g. "\boxedx" is another command, or the text ends right after "\boxed"
    content = content.strip() if content is not None else None
    return content or None


def _balanced_group(text: str, open_pos: int) -> str | None:
    """Content of the brace group opening at text[open_pos] == '{'; None if it never closes."""
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # an escaped character such as \{ or \} never changes the depth
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1:i]
        i += 1
    return None


def _bare_token(text: str, pos: int) -> str | None:
    """`\\boxed 5$`: the run of characters after the spaces, up to whitespace or '$'."""
    rest = text[pos:].lstrip(" ")
    end = 0
    while end < len(rest) and rest[end] not in " \t\n$":
        end += 1
    return rest[:end] or None


def _last_number(text: str) -> str | None:
    numbers = _LAST_NUMBER.findall(text[-10_000:])
    return numbers[-1].rstrip(",") if numbers else None


_CHOICE_PATTERNS = [
    re.compile(r"(?i:answer)(?:\s{1,4}is|\s{0,4}:)[\s:*(]{0,8}([A-J])(?![A-Za-z])"),
    re.compile(r"\(([A-J])\)"),
]
_CHOICE_IN_BOX = re.compile(r"^\(?([A-J])\)?(?:$|[\s).:])")
_WRAPPERS = ("\\text{", "\\textbf{", "\\mathrm{", "\\mathbf{", "\\mbox{")


def extract_choice(text: str | None, choices: str = "ABCD") -> str | None:
    """The multiple-choice letter a response commits to (GPQA-style), or None.

    The last box wins ("\\boxed{B}", "\\boxed{(B)}", "\\boxed{\\text{(B) 42}}"); without a box, the last
    "answer is (B)" / "Answer: B" phrase, then the last "(B)". Letters outside `choices` are ignored.
    """
    if not text:
        return None
    boxed = extract_answer(text)
    if boxed is not None:
        letter = _choice_in_box(boxed)
        if letter is not None and letter in choices:
            return letter
    tail = text[-10_000:]
    for pattern in _CHOICE_PATTERNS:
        letters = [m for m in pattern.findall(tail) if m in choices]
        if letters:
            return letters[-1]
    return None


def _choice_in_box(content: str) -> str | None:
    for wrapper in _WRAPPERS:
        content = content.replace(wrapper, "")
    match = _CHOICE_IN_BOX.match(content.replace("{", "").replace("}", "").strip())
    return match.group(1) if match else None
