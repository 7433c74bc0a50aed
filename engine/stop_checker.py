"""A sequence's text as it is generated, and where it stops on text (stop strings and stop_regex).

Each step decodes only the newest few tokens (vLLM's prefix / read offsets: a token that is part of a
multi-byte character waits until the character is complete) and streams the new characters through the
stop patterns' automaton (engine/stop_regex.py), so the cost of a step does not grow with the response.
"""
from __future__ import annotations

from collections.abc import Callable

from engine.stop_regex import StopMatcher, StopPatterns

Decode = Callable[[list[int]], str]


class TextStop:
    """The completion's text, its stop matcher, and per token where the text stood after it (for forks)."""

    def __init__(self, patterns: StopPatterns, decode: Decode, start: int) -> None:
        self.patterns, self.decode, self.start = patterns, decode, start
        self.matcher = StopMatcher(patterns)
        self.text = ""  # of the tokens from index `start` (the completion) on
        self.prefix_offset = self.read_offset = start  # token indices
        self.marks: list[tuple[int, int, int]] = []  # per completion token: (len(text), prefix, read offsets) after it
        self.span: tuple[int, int] | None = None     # the stop match (start, end) in text

    def step(self, token_ids: list[int]) -> bool:
        """Reads the newest token of `token_ids` (one more than at the last call); True on a stop match."""
        delta = self._new_text(token_ids)
        self.text += delta
        self.marks.append((len(self.text), self.prefix_offset, self.read_offset))
        end = self.matcher.feed(delta) if delta else None
        if end is None:
            return False
        self.span = (self.matcher.match_start(self.text, end), end)
        return True

    def _new_text(self, ids: list[int]) -> str:
        before = self.decode(ids[self.prefix_offset:self.read_offset])
        after = self.decode(ids[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character (or a token with no text): wait for the next one
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return after[len(before):]

    def fork(self, token_ids: list[int], num_tokens: int) -> TextStop:
        """The state after the first `num_tokens` completion tokens of `token_ids` (a branch forked there)."""
        child = TextStop(self.patterns, self.decode, self.start)
        child.marks = self.marks[:num_tokens]
        if child.marks:
            length, child.prefix_offset, child.read_offset = child.marks[-1]
            child.text = self.text[:length]
            child.matcher.feed(child.text)  # the parent did not stop within it, so no match here either
        for end in range(self.start + len(child.marks) + 1, self.start + num_tokens + 1):
            child.step(token_ids[:end])  # the parent's last token, never read when it ended the parent (EOS)
        return child

    def final_length(self) -> int:
        """Before a match: how many characters of the text no stop match can cut (a partial match that may still
        complete starts there)."""
        return self.matcher.live_start

    @property
    def matched(self) -> str | None:
        return None if self.span is None else self.text[self.span[0]:self.span[1]]

    def output_text(self, include_stop: bool) -> str:
        """The text cut at the match's end (include_stop) or start."""
        assert self.span is not None
        return self.text[:self.span[1] if include_stop else self.span[0]]
