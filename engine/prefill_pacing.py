"""Spacing a long prompt's prefill pieces so that running decodes keep a share of their pace.

A piece of a long prompt costs attention over every key cached before it, so late pieces of a 4096-token prompt
make a step several times longer than the decodes beside it. The pacer lets such a piece into a step only while
the decodes have had at least `decode_share` of the wall time since the long prefill began, counted from measured
step cycles (the start of one step to the start of the next: what a decode waits for its next token). A
decode-only cycle of d seconds earns d / share - d, a cycle with a paced piece that took t earns d / share - t (d:
the latest decode-only cycle), and nothing is banked beyond zero, so the share holds over every stretch of steps,
not only on average. Pieces keep their chunk-grid boundaries, so spacing them changes when a prompt's first token
comes, never which tokens anyone samples."""
from __future__ import annotations

from dataclasses import dataclass

TOLERANCE = 1e-9  # seconds: float sums of step times that cancel exactly on paper


@dataclass
class StepKind:
    """What the scheduler put in a step, for the pacer to account when its time is known."""
    num_decodes: int = 0
    num_prefill: int = 0  # prefill pieces of any prompt
    paced: bool = False  # one of the pieces is a long prompt's (paced)


class PrefillPacer:
    def __init__(self, decode_share: float) -> None:  # in [0, 1): EngineConfig checks it
        self.share = decode_share
        self.decode_seconds: float | None = None  # the latest decode-only step's time
        self.credit = 0.0  # <= 0: minus the decode time still owed before the next paced piece
        self.last = StepKind()
        self.measure_first = False  # a paced step ran without a fresh decode-only cycle: measure one before the next

    @property
    def enabled(self) -> bool:
        return self.share > 0

    def allow(self) -> bool:
        """May a long prompt's piece join the next step (beside running decodes)?"""
        return not self.enabled or (self.credit >= -TOLERANCE and not self.measure_first)

    def scheduled(self, kind: StepKind, long_pending: bool) -> None:
        """The step just scheduled; long_pending: a long prompt is prefilling (or waiting) beside decodes."""
        self.last = kind
        if not long_pending or not kind.num_decodes:
            self.credit, self.measure_first = 0.0, False  # nothing to pace: no debt or savings carry over

    def observe(self, seconds: float) -> None:
        """The last scheduled step's cycle: from its start to the start of the next step."""
        kind = self.last
        if not self.enabled or not kind.num_decodes:
            return
        if not kind.num_prefill:
            self.decode_seconds, self.measure_first = seconds, False
        if kind.paced and (self.decode_seconds is None or self.decode_seconds > seconds):
            # no decode-only cycle yet, or a stale one (longer than this cycle with a piece: a pause between steps)
            self.measure_first, earned = True, 0.0
        elif kind.paced:
            assert self.decode_seconds is not None
            earned = self.decode_seconds / self.share - seconds
        else:  # decodes (and maybe short prompts' pieces, which are not the long prompt's to pay for)
            earned = (self.decode_seconds or seconds) * (1 / self.share - 1)
        self.credit = min(self.credit + earned, 0.0)  # nothing banked: the share holds over every stretch of steps
