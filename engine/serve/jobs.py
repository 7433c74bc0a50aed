"""What a request is to the engine loop: a `Job` that starts its sequences, takes each step's finished ones, says
when it is done, and gives its result (or, streaming, what each sample gained since the last step).

engine_loop.py calls only the members of `Job`; GenerateJob (completions, chat) and TreeJob (sample_tree) are the
two kinds.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.sequence import Sequence

if TYPE_CHECKING:  # annotations only
    from engine.llm_engine import LLMEngine
    from engine.tree import TreeResult, TreeRun

Event = tuple[str, Any]  # ("delta", list[Delta]) | ("done", the job's result) | ("error", (http status, message))
Emit = Callable[[Event], object]  # thread-safe: the handler's way to hear from the loop thread (result unused)
Requests = list[tuple[list[int], list[Sequence]]]  # (prompt ids, its n samples) per prompt
TopLogprobs = tuple[float, list[tuple[int, float]]]  # per token: its raw logprob, the top (token id, logprob) pairs


@dataclass
class Delta:
    index: int                  # sample index within the job (prompt i, sample j -> i * n + j)
    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    top_logprobs: list[TopLogprobs]
    finish_reason: str | None
    text: str | None = None                 # the whole final text, once finished
    stop_reason: str | int | None = None
    final_length: int | None = None         # unfinished: characters of its text no stop match can cut (None: all)


def final_length(seq: Sequence) -> int | None:
    """An unfinished sequence's characters that no stop string or stop_regex match can cut (None: no such stops)."""
    if seq.text_stop is not None:
        return seq.text_stop.final_length()
    return 0 if seq.params.stop or seq.params.stop_regex else None


class Job(ABC):
    """A request's work on the engine loop's thread, which owns the engine: start() queues its sequences, on_step()
    takes each step's finished ones, and once `done` the loop sends ("done", result()) through `emit`. A
    streaming job also sends ("delta", deltas()) after each step. abort() frees whatever it holds, whenever."""
    emit: Emit
    stream: bool = False

    @abstractmethod
    def start(self, engine: LLMEngine) -> None:
        """Queues its sequences (raises for one the engine refuses)."""

    @abstractmethod
    def sequences(self) -> list[Sequence]:
        """Its sequences that may still take a step."""

    @abstractmethod
    def on_step(self, engine: LLMEngine, finished: list[Sequence]) -> None:
        """Takes its own among the sequences a step finished."""

    @property
    @abstractmethod
    def done(self) -> bool: ...

    @abstractmethod
    def result(self) -> object:
        """What the ("done", ...) event carries."""

    @abstractmethod
    def abort(self, engine: LLMEngine) -> None:
        """Frees every sequence it holds (idempotent)."""

    def deltas(self) -> list[Delta]:
        """Streaming: what each sample gained since the last call."""
        return []


class GenerateJob(Job):
    """The samples of one or more prompts (a completions or chat request): requests = [(prompt ids, seqs)]."""

    def __init__(self, requests: Requests, emit: Emit, stream: bool = False,
                 final_text: Callable[[Sequence], str] | None = None) -> None:
        self.requests, self.emit, self.stream, self.final_text = requests, emit, stream, final_text
        self.seqs = [s for _, seqs in requests for s in seqs]
        self.uids = {s.uid: k for k, s in enumerate(self.seqs)}
        self.sent = [0] * len(self.seqs)      # tokens already streamed, per sample
        self.ended = [False] * len(self.seqs)  # its finish_reason has been streamed
        self.left = len(self.seqs)

    def start(self, engine: LLMEngine) -> None:
        for _, seqs in self.requests:
            engine.add_sequence(seqs[0])      # its n - 1 siblings start from its prefill logits

    def sequences(self) -> list[Sequence]:
        return [s for s in self.seqs if s.finish_reason is None]

    def on_step(self, engine: LLMEngine, finished: list[Sequence]) -> None:
        for seq in finished:
            if seq.uid in self.uids:
                engine.free(seq)
                self.left -= 1

    @property
    def done(self) -> bool:
        return self.left == 0

    def deltas(self) -> list[Delta]:
        """Streaming: what each sample gained since the last call (copied here, on the loop thread)."""
        out: list[Delta] = []
        for k, seq in enumerate(self.seqs):
            start, end, reason = self.sent[k], seq.num_completion_tokens, seq.finish_reason
            if end > start or (reason and not self.ended[k]):
                n0 = seq.num_prompt_tokens
                text = self.final_text(seq) if reason and self.final_text else None
                out.append(Delta(k, seq.token_ids[n0 + start:n0 + end], seq.logprobs[start:end],
                                 seq.entropies[start:end], seq.top_logprobs[start:end], reason, text,
                                 seq.stop_reason, None if reason else final_length(seq)))
                self.sent[k], self.ended[k] = end, reason is not None
        return out

    def result(self) -> Requests:
        return self.requests

    def abort(self, engine: LLMEngine) -> None:
        for seq in self.seqs:
            engine.free(seq)  # idempotent; frees a waiting, running or finished sequence's blocks


class TreeJob(Job):
    """One sample_tree request: engine.tree's TreeRun, driven by the shared step loop."""

    def __init__(self, run: TreeRun, prompt_ids: list[list[int]], seeds: list[int], emit: Emit) -> None:
        self.run, self.prompt_ids, self.seeds, self.emit = run, prompt_ids, seeds, emit

    def start(self, engine: LLMEngine) -> None:
        self.run.begin(self.prompt_ids, self.seeds)

    def sequences(self) -> list[Sequence]:
        return [seq for seq, *_ in self.run.owners.values()]

    def on_step(self, engine: LLMEngine, finished: list[Sequence]) -> None:
        self.run.on_step(finished)

    @property
    def done(self) -> bool:
        return self.run.done

    def result(self) -> list[TreeResult]:
        return self.run.sorted_results()

    def abort(self, engine: LLMEngine) -> None:
        self.run.abort()
