"""Stop patterns matched as text streams in, in time linear in the text whatever the pattern.

A pattern is parsed by Python's own regex parser and compiled to a Thompson NFA, which runs as a lazily built
DFA (states are sets of NFA nodes, transitions cached per character, the cache bounded): one dictionary lookup
per new character once warm, and no backtracking, so `(a+)+$` costs what `a` costs. Supported: literals,
escapes, classes (`[...]`, `\\d \\w \\s` and negations), `.`, groups, alternation, `* + ? {m,n}` (greedy or
lazy: only where a match ends matters), `^`/`\\A` (start of the generated text), `$`/`\\Z` (end of the text
generated so far), and the flags i, s, a. Backreferences, lookarounds, `\\b` and possessive or atomic groups
are refused with ValueError.

Semantics: generation stops at the first position where any pattern's match ends (the earliest end); the
match reported is the one that ends there and starts leftmost.

The matcher also knows where the earliest partial match that may still complete starts (`StopMatcher.live_start`):
its states group the NFA nodes by where their threads started (Pike VM style), so the text before that start is
final and a stream may send it.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

try:  # Python >= 3.11
    from re import _constants as C  # type: ignore[attr-defined]  # private in typeshed, there since 3.11
    from re import _parser as sre_parse  # type: ignore[attr-defined]  # private in typeshed, there since 3.11
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as C
    import sre_parse

MAX_NFA_NODES = 20_000     # bounds `x{1000}{1000}` before it is built
MAX_CACHED_TRANSITIONS = 100_000  # the lazy DFA's cache is dropped (and rebuilt on demand) beyond this

CHAR, SPLIT, BEGIN, END, MATCH = range(5)
Predicate = Callable[[str], bool]  # does a CHAR node take this character
Parsed = Any  # the private sre_parse types: a SubPattern, its (op, arg) items and their args


class _Nfa:
    """Nodes as parallel lists: kind, out1, out2 (SPLIT only), predicate (CHAR only)."""

    def __init__(self) -> None:
        self.kind: list[int] = []
        self.out1: list[int] = []
        self.out2: list[int] = []
        self.pred: list[Predicate | None] = []

    def add(self, kind: int, out1: int = -1, out2: int = -1, pred: Predicate | None = None) -> int:
        if len(self.kind) >= MAX_NFA_NODES:
            raise ValueError(f"stop pattern too large: its automaton exceeds {MAX_NFA_NODES} states "
                             f"(lower the repetition counts)")
        self.kind.append(kind)
        self.out1.append(out1)
        self.out2.append(out2)
        self.pred.append(pred)
        return len(self.kind) - 1


_CATEGORIES = {
    C.CATEGORY_DIGIT: str.isdecimal,
    C.CATEGORY_SPACE: str.isspace,
    C.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
}
_NEGATED = {C.CATEGORY_NOT_DIGIT: C.CATEGORY_DIGIT, C.CATEGORY_NOT_SPACE: C.CATEGORY_SPACE,
            C.CATEGORY_NOT_WORD: C.CATEGORY_WORD}


def _category(code: Parsed, ascii_only: bool) -> Predicate:
    """\\d \\s \\w and their negations; under the ASCII flag only ASCII characters are in the positive ones."""
    test = _CATEGORIES.get(_NEGATED.get(code, code))
    if test is None:
        raise ValueError(f"unsupported character category {code} in a stop pattern")
    positive = (lambda c: c.isascii() and test(c)) if ascii_only else test
    return (lambda c: not positive(c)) if code in _NEGATED else positive


class _Compiler:
    """sre_parse tree -> NFA, built back to front (each item gets the node that follows it)."""

    def __init__(self, nfa: _Nfa, reverse: bool) -> None:
        self.nfa, self.reverse = nfa, reverse

    def sequence(self, items: Parsed, nxt: int, flags: int) -> int:
        for op, arg in (items if self.reverse else reversed(list(items))):
            nxt = self.item(op, arg, nxt, flags)
        return nxt

    def item(self, op: Parsed, arg: Parsed, nxt: int, flags: int) -> int:
        nfa = self.nfa
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN):
            return nfa.add(CHAR, nxt, pred=self.predicate(op, arg, flags))
        if op is C.SUBPATTERN:
            _group, add_flags, del_flags, sub = arg
            return self.sequence(sub, nxt, (flags | add_flags) & ~del_flags)
        if op is C.BRANCH:
            starts = [self.sequence(alt, nxt, flags) for alt in arg[1]]
            head = starts[-1]
            for start in reversed(starts[:-1]):
                head = nfa.add(SPLIT, start, head)
            return head
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            low, high, sub = arg
            return self.repeat(low, high, sub, nxt=nxt, flags=flags)
        if op is C.AT:
            if arg in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
                return nfa.add(BEGIN, nxt)
            if arg in (C.AT_END, C.AT_END_STRING):
                return nfa.add(END, nxt)
            raise ValueError("\\b and \\B are not supported in stop patterns")
        raise ValueError(f"{str(op).lower()} is not supported in stop patterns (no backreferences, lookarounds, "
                         f"possessive or atomic groups)")

    def repeat(self, low: int, high: int, sub: Parsed, nxt: int, flags: int) -> int:
        if high is C.MAXREPEAT or high == C.MAXREPEAT:
            loop = self.nfa.add(SPLIT, -1, nxt)
            self.nfa.out1[loop] = self.sequence(sub, loop, flags)
            nxt = loop
        else:
            for _ in range(high - low):  # x? nested: (x(x)?)? ...
                nxt = self.nfa.add(SPLIT, self.sequence(sub, nxt, flags), nxt)
        for _ in range(low):
            nxt = self.sequence(sub, nxt, flags)
        return nxt

    @staticmethod
    def predicate(op: Parsed, arg: Parsed, flags: int) -> Predicate:
        if op is C.ANY:
            return (lambda c: True) if flags & sre_parse.SRE_FLAG_DOTALL else (lambda c: c != "\n")
        items = {C.LITERAL: [(C.LITERAL, arg)], C.NOT_LITERAL: [(C.NEGATE, None), (C.LITERAL, arg)]}.get(op, arg)
        test = _in_test(items, bool(flags & sre_parse.SRE_FLAG_ASCII))
        if flags & sre_parse.SRE_FLAG_IGNORECASE:
            return lambda c: test(c) or test(c.lower()) or test(c.upper())
        return test


def _in_test(items: Parsed, ascii_only: bool) -> Predicate:
    negate = bool(items) and items[0][0] is C.NEGATE
    chars: set[str] = set()
    ranges: list[tuple[int, int]] = []
    tests: list[Predicate] = []
    for op, arg in items[1:] if negate else items:
        if op is C.LITERAL:
            chars.add(chr(arg))
        elif op is C.RANGE:
            ranges.append(arg)
        elif op is C.CATEGORY:
            tests.append(_category(arg, ascii_only))
        else:
            raise ValueError(f"unsupported class item {op} in a stop pattern")

    def test(c: str) -> bool:
        hit = c in chars or any(lo <= ord(c) <= hi for lo, hi in ranges) or any(t(c) for t in tests)
        return hit != negate
    return test


Groups = tuple[frozenset[int], ...]
Move = tuple["Ranked", tuple[int, ...], bool]  # the next state, the groups it continues, whether it restarted


class Ranked:
    """A state of the unanchored forward run: NFA nodes grouped by where their threads started, earliest first
    (disjoint: a node reached from two starts stays in the earlier one's group; the later thread can do nothing the
    earlier cannot). Its moves are cached on it, per character: (next state, per next group but a restarted one the
    group it continues, whether the last group is the threads that start after the character)."""
    __slots__ = ("groups", "accepts", "first_live", "moves")

    def __init__(self, groups: Groups, accepts: bool, first_live: int) -> None:
        self.groups, self.accepts = groups, accepts
        self.first_live = first_live  # the first group that can still read a character or matched; len if none
        self.moves: dict[str, Move] = {}


class Automaton:
    """One NFA run as a lazily built DFA. `reverse` builds the mirror image (for finding where a match starts)."""

    def __init__(self, patterns: tuple[str, ...], reverse: bool = False) -> None:
        self.nfa = _Nfa()
        match = self.nfa.add(MATCH)
        starts = []
        for pattern in patterns:
            parsed = _parse(pattern)
            starts.append(_Compiler(self.nfa, reverse).sequence(parsed, match, parsed.state.flags))
        head = starts[-1]
        for start in reversed(starts[:-1]):
            head = self.nfa.add(SPLIT, start, head)
        self.start = head
        self.has_end_anchor = END in self.nfa.kind
        self._cache: dict[tuple[frozenset[int], str], frozenset[int]] = {}
        self._ranked: dict[Groups, Ranked] = {}  # the unanchored run's states, each with its cached moves
        self._num_moves = 0

    def closure(self, nodes: Iterable[int], at_begin: bool, at_end: bool) -> frozenset[int]:
        """Nodes reachable without reading a character; BEGIN / END pass only where they hold. CHAR, MATCH and
        the assertions that did not pass (they may pass later) are kept."""
        kind, out1, out2 = self.nfa.kind, self.nfa.out1, self.nfa.out2
        seen: set[int] = set()
        stack, kept = list(nodes), []
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            k = kind[n]
            if k == SPLIT:
                stack += (out1[n], out2[n])
            elif (k == BEGIN and at_begin) or (k == END and at_end):
                stack.append(out1[n])
            else:
                kept.append(n)
        return frozenset(kept)

    def accepts_empty(self) -> bool:
        return self.accepts(self.closure([self.start], True, True))

    def accepts(self, state: frozenset[int]) -> bool:
        return 0 in state  # node 0 is MATCH

    def accepts_at_end(self, state: frozenset[int], at_begin: bool) -> bool:
        """A match ends here if the text ended now (END nodes pass)."""
        return self.accepts(self.closure(state, at_begin, True)) if self.has_end_anchor else self.accepts(state)

    def step(self, state: frozenset[int], c: str) -> frozenset[int]:
        """The state after reading `c` (anchored: no match begins after the start)."""
        key = (state, c)
        nxt = self._cache.get(key)
        if nxt is None:
            nxt = self.closure(self._moved(state, c), False, False)
            if len(self._cache) >= MAX_CACHED_TRANSITIONS:
                self._cache.clear()
            self._cache[key] = nxt
        return nxt

    def _moved(self, nodes: frozenset[int], c: str) -> list[int]:
        kind, out1, pred = self.nfa.kind, self.nfa.out1, self.nfa.pred
        return [out1[n] for n in nodes if kind[n] == CHAR and pred[n](c)]  # type: ignore[misc]  # CHAR: a pred

    # ---- the unanchored run, its nodes grouped by where their threads started -------------------------------
    @functools.cached_property
    def restart(self) -> frozenset[int]:
        """The threads that start after a character (a match may begin anywhere)."""
        return self.closure([self.start], False, False)

    def begin(self) -> Ranked:
        return self._intern((self.closure([self.start], True, False),))

    def advance(self, state: Ranked, c: str) -> Move:
        """The unanchored state after reading `c`: each group moves on, the restart comes last."""
        move = state.moves.get(c)
        if move is None:
            claimed: set[int] = set()
            moved, kept = [], []
            for j, group in enumerate(state.groups):
                nodes = self.closure(self._moved(group, c), False, False) - claimed
                if nodes:
                    moved.append(nodes)
                    kept.append(j)
                    claimed |= nodes
            fresh = self.restart - claimed
            move = self._intern((*moved, fresh) if fresh else tuple(moved)), tuple(kept), bool(fresh)
            if self._num_moves >= MAX_CACHED_TRANSITIONS:
                self._forget_moves()
            state.moves[c] = move
            self._num_moves += 1
        return move

    def _intern(self, groups: Groups) -> Ranked:
        state = self._ranked.get(groups)
        if state is None:
            kind = self.nfa.kind
            live = (j for j, g in enumerate(groups) if any(kind[n] in (CHAR, MATCH) for n in g))
            state = self._ranked[groups] = Ranked(groups, any(map(self.accepts, groups)), next(live, len(groups)))
        return state

    def _forget_moves(self) -> None:
        for state in self._ranked.values():
            state.moves.clear()
        self._ranked.clear()
        self._num_moves = 0


def _parse(pattern: str) -> Parsed:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"stop patterns must be non-empty strings, got {pattern!r}")
    try:
        parsed = sre_parse.parse(pattern)
    except Exception as e:  # re.error, RecursionError, OverflowError on absurd repeat counts
        raise ValueError(f"invalid stop_regex {pattern!r}: {e}") from None
    if parsed.state.flags & (sre_parse.SRE_FLAG_MULTILINE | sre_parse.SRE_FLAG_VERBOSE):
        raise ValueError(f"stop_regex {pattern!r}: the m and x flags are not supported")
    return parsed


@dataclass(frozen=True)
class StopPatterns:
    """Stop strings and regular expressions of one SamplingParams, compiled once (shared by equal requests)."""
    strings: tuple[str, ...]
    regexes: tuple[str, ...]

    @functools.cached_property
    def forward(self) -> Automaton:
        return Automaton(self.sources)

    @functools.cached_property
    def backward(self) -> Automaton:
        return Automaton(self.sources, reverse=True)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(_escape(s) for s in self.strings) + self.regexes

    def find_start(self, text: str, end: int, at_check_end: bool) -> int:
        """Leftmost start of a match that ends at `end` (one backward pass; the caller knows one exists)."""
        auto = self.backward
        state = auto.closure([auto.start], end == 0, at_check_end)
        best = end if auto.accepts(state) else -1
        for p in range(end - 1, -1, -1):
            state = auto.step(state, text[p])
            if p == 0:
                state = auto.closure(state, True, False)  # BEGIN holds at the text's start
            if not state:
                break
            if auto.accepts(state):
                best = p
        return best


def _escape(s: str) -> str:
    """A literal as a pattern the parser reads back as itself."""
    return "".join("\\" + c if c in "\\.^$*+?{}[]|()" else c for c in s)


@functools.lru_cache(maxsize=256)
def compile_stop_patterns(strings: tuple[str, ...], regexes: tuple[str, ...]) -> StopPatterns | None:
    """Parses and builds the automata now (so a bad pattern fails at once); None when there is nothing to stop on.

    Raises ValueError for a pattern that cannot be parsed, uses an unsupported construct, is too large, or
    matches the empty string (it would stop before the first token)."""
    if not strings and not regexes:
        return None
    patterns = StopPatterns(strings, regexes)
    forward = patterns.forward
    if forward.accepts_empty():
        empty = [s for s in patterns.sources if Automaton((s,)).accepts_empty()]
        raise ValueError(f"stop pattern {empty[0]!r} matches the empty string; it would stop at once")
    patterns.backward  # noqa: B018 - built now, so its cost is paid at construction
    return patterns


class StopMatcher:
    """Streams a sequence's generated text through its patterns; `feed` reports where the first match ends."""

    def __init__(self, patterns: StopPatterns) -> None:
        self.patterns = patterns
        self.auto = patterns.forward
        self.state = self.auto.begin()
        self.starts = [0]  # per group of the state: where its threads started
        self.length = 0  # characters read

    def feed(self, chunk: str) -> int | None:
        """Reads `chunk`; returns the end offset (in the whole text) of the earliest match, or None."""
        auto, state, starts, at = self.auto, self.state, self.starts, self.length
        advance = auto.advance
        for c in chunk:
            state, kept, restarted = state.moves.get(c) or advance(state, c)
            at += 1
            starts = [starts[j] for j in kept]
            if restarted:
                starts.append(at)
            if state.accepts:
                break
        self.state, self.starts, self.length = state, starts, at
        if state.accepts:
            return at
        if chunk and auto.has_end_anchor and auto.accepts_at_end(frozenset().union(*state.groups), at == 0):
            return at
        return None

    @property
    def live_start(self) -> int:
        """Before a match: where the earliest partial match that may still complete starts (`length` if none).
        No match can start before it, so the text before it is final."""
        state = self.state
        return self.starts[state.first_live] if state.first_live < len(state.groups) else self.length

    def match_start(self, text: str, end: int) -> int:
        """Where the match that `feed` reported ending at `end` starts (`text`: everything fed)."""
        return self.patterns.find_start(text, end, at_check_end=end == self.length)
