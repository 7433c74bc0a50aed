"""What a request is to the engine loop: a job that starts its sequences, takes each step's finished ones, says
when it is done, and gives its result (or, streaming, what each sample gained since the last step).

A job's interface (engine_loop.py calls only these): start(engine), sequences() (those that may still take a
step), on_step(engine, finished), done, result(), abort(engine), stream, deltas(), emit(event).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.sequence import Sequence


@dataclass
class Delta:
    index: int                  # sample index within the job (prompt i, sample j -> i * n + j)
    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    top_logprobs: list
    finish_reason: str | None
    text: str | None = None                 # the whole final text, once finished
    stop_reason: str | int | None = None


class GenerateJob:
    """The samples of one or more prompts (a completions or chat request): requests = [(prompt ids, seqs)]."""

    def __init__(self, requests: list[tuple[list[int], list[Sequence]]], emit: Callable, stream: bool = False,
                 final_text: Callable[[Sequence], str] | None = None):
        self.requests, self.emit, self.stream, self.final_text = requests, emit, stream, final_text
        self.seqs = [s for _, seqs in requests for s in seqs]
        self.uids = {s.uid: k for k, s in enumerate(self.seqs)}
        self.sent = [0] * len(self.seqs)      # tokens already streamed, per sample
        self.ended = [False] * len(self.seqs)  # its finish_reason has been streamed
        self.left = len(self.seqs)

    def start(self, engine):
        for _, seqs in self.requests:
            engine.add_sequence(seqs[0])      # its n - 1 siblings start from its prefill logits

    def sequences(self) -> list[Sequence]:
        """Its sequences that may still take a step."""
        return [s for s in self.seqs if s.finish_reason is None]

    def on_step(self, engine, finished: list[Sequence]):
        for seq in finished:
            if seq.uid in self.uids:
                engine.free(seq)
                self.left -= 1

    @property
    def done(self) -> bool:
        return self.left == 0

    def deltas(self) -> list[Delta]:
        """Streaming: what each sample gained since the last call (copied here, on the loop thread)."""
        out = []
        for k, seq in enumerate(self.seqs):
            start, end, reason = self.sent[k], seq.num_completion_tokens, seq.finish_reason
            if end > start or (reason and not self.ended[k]):
                n0 = seq.num_prompt_tokens
                text = self.final_text(seq) if reason and self.final_text else None
                out.append(Delta(k, seq.token_ids[n0 + start:n0 + end], seq.logprobs[start:end],
                                 seq.entropies[start:end], seq.top_logprobs[start:end], reason, text,
                                 seq.stop_reason))
                self.sent[k], self.ended[k] = end, reason is not None
        return out

    def result(self):
        return self.requests

    def abort(self, engine):
        for seq in self.seqs:
            engine.free(seq)  # idempotent; frees a waiting, running or finished sequence's blocks


class TreeJob:
    """One sample_tree request, driven by engine.tree's run object inside the shared step loop."""

    def __init__(self, run, prompt_ids: list[list[int]], seeds: list[int], emit: Callable):
        self.run, self.prompt_ids, self.seeds, self.emit, self.stream = run, prompt_ids, seeds, emit, False

    def start(self, engine):
        self.run.begin(self.prompt_ids, self.seeds)

    def sequences(self) -> list[Sequence]:
        return [seq for seq, *_ in self.run.owners.values()]

    def on_step(self, engine, finished: list[Sequence]):
        self.run.on_step(finished)

    @property
    def done(self) -> bool:
        return self.run.done

    def result(self):
        return self.run.sorted_results()

    def abort(self, engine):
        self.run.abort()
