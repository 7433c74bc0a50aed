"""The engine loop: one thread owns the engine; HTTP handlers submit jobs and await their events.

Every job's sequences join one continuous batch (LLMEngine.step). A job reports through `emit(event)`, a
thread-safe callback the handler gives it: ("delta", [...]) after each step for streaming jobs, then
("done", result) or ("error", (http_status, message)). Everything that touches the engine runs on this thread:
submissions, aborts (a client that disconnects frees its sequences' KV blocks here), and "barriers", functions
run only when no job is in flight (weight updates, cache resets, pause): while one waits, new jobs are held.

Noise is keyed by (seed, seq_id, position) with seq_id = sample index within its request, so a request's
tokens do not depend on the other requests in the batch.
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.sequence import Sequence

log = logging.getLogger("engine.serve")
IDLE_POLL_S = 0.5


class Busy(RuntimeError):
    """A state-changing call refused because requests are in flight (the caller asked not to wait)."""


class Aborted(RuntimeError):
    """A job aborted by the server (/pause?mode=abort, shutdown)."""


@dataclass
class Delta:
    index: int                  # sample index within the job (prompt i, sample j -> i * n + j)
    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    top_logprobs: list
    finish_reason: str | None


class GenerateJob:
    """The samples of one or more prompts (a completions or chat request): requests = [(prompt ids, seqs)]."""

    def __init__(self, requests: list[tuple[list[int], list[Sequence]]], emit: Callable, stream: bool = False):
        self.requests, self.emit, self.stream = requests, emit, stream
        self.seqs = [s for _, seqs in requests for s in seqs]
        self.uids = {s.uid: k for k, s in enumerate(self.seqs)}
        self.sent = [0] * len(self.seqs)      # tokens already streamed, per sample
        self.ended = [False] * len(self.seqs)  # its finish_reason has been streamed
        self.left = len(self.seqs)

    def start(self, engine):
        for _, seqs in self.requests:
            engine.add_sequence(seqs[0])      # its n - 1 siblings start from its prefill logits

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
                out.append(Delta(k, seq.token_ids[n0 + start:n0 + end], seq.logprobs[start:end],
                                 seq.entropies[start:end], seq.top_logprobs[start:end], reason))
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

    def on_step(self, engine, finished: list[Sequence]):
        self.run.on_step(finished)

    @property
    def done(self) -> bool:
        return self.run.done

    def result(self):
        return self.run.sorted_results()

    def abort(self, engine):
        self.run.abort()


class EngineLoop:
    def __init__(self, llm):
        self.llm, self.engine = llm, llm.engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.active: list = []                 # jobs whose sequences are in the engine
        self.held: deque = deque()             # submitted, not yet admitted (paused, or a barrier waits)
        self.barriers: deque = deque()         # (fn, future) to run once no job is in flight
        self.paused = False
        self._stopping = False
        self.num_steps = 0
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # ---- called from any thread ------------------------------------------------------------------------
    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 10.0):
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    def submit(self, job):
        self._inbox.put(("submit", job))

    def abort(self, job):
        self._inbox.put(("abort", job))

    def barrier(self, fn: Callable, if_busy: str = "wait") -> concurrent.futures.Future:
        """Runs fn() on the loop thread once no job is in flight; new jobs wait meanwhile. if_busy="refuse":
        fails at once with Busy when jobs are in flight (or held)."""
        future = concurrent.futures.Future()
        self._inbox.put(("barrier", (fn, future, if_busy)))
        return future

    def pause(self, mode: str) -> concurrent.futures.Future:
        """mode "wait": new jobs are held and the future resolves when the jobs in flight have finished;
        "abort": the jobs in flight are aborted (their clients get an error) and held jobs stay held."""
        future = concurrent.futures.Future()
        self._inbox.put(("pause", (mode, future)))
        return future

    def resume(self) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        self._inbox.put(("resume", future))
        return future

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # ---- the loop thread ----------------------------------------------------------------------------------
    def _run(self):
        while not self._stopping:
            self._drain(block=not self._has_work())
            self._run_barriers()
            self._admit()
            if self.active:
                self._step()
        self._shutdown()

    def _has_work(self) -> bool:
        return bool(self.active or self.barriers or (self.held and not self.paused))

    def _drain(self, block: bool):
        try:
            message = self._inbox.get(timeout=IDLE_POLL_S) if block else self._inbox.get_nowait()
            while True:
                self._handle(*message)
                message = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _handle(self, kind: str, payload):
        if kind == "submit":
            self.held.append(payload)
        elif kind == "abort":
            self._abort(payload)
        elif kind == "barrier":
            fn, future, if_busy = payload
            if if_busy == "refuse" and (self.active or self.held):
                future.set_exception(Busy(f"{len(self.active) + len(self.held)} requests are in flight; "
                                          f"retry later or ask to wait (if_busy=wait)"))
            else:
                self.barriers.append((fn, future))
        elif kind == "pause":
            mode, future = payload
            self.paused = True
            if mode == "abort":
                for job in list(self.active):
                    self._fail(job, Aborted("aborted by /pause?mode=abort"))
            self.barriers.append((lambda: None, future))
        elif kind == "resume":
            self.paused = False
            payload.set_result(None)
        elif kind == "stop":
            self._stopping = True

    def _run_barriers(self):
        while self.barriers and not self.active:
            fn, future = self.barriers.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - reported to the caller
                    future.set_exception(e)

    def _admit(self):
        while self.held and not self.paused and not self.barriers:
            job = self.held.popleft()
            try:
                job.start(self.engine)
            except Exception as e:  # noqa: BLE001 - a request the engine refuses fails alone
                job.abort(self.engine)
                _emit(job, ("error", (400, str(e))))
                continue
            self.active.append(job)

    def _step(self):
        try:
            finished = self.engine.step()
        except Exception as e:
            log.exception("engine step failed")
            for job in list(self.active):
                self._fail(job, e, status=500)
            return
        self.num_steps += 1
        for job in list(self.active):
            job.on_step(self.engine, finished)
            if job.stream:
                deltas = job.deltas()
                if deltas:
                    _emit(job, ("delta", deltas))
            if job.done:
                self.active.remove(job)
                _emit(job, ("done", job.result()))

    def _abort(self, job):
        if job in self.held:
            self.held.remove(job)
        elif job in self.active:
            self.active.remove(job)
            job.abort(self.engine)

    def _fail(self, job, error: Exception, status: int = 503):
        self._abort(job)
        _emit(job, ("error", (status, f"{type(error).__name__}: {error}")))

    def _shutdown(self):
        for job in [*self.active, *self.held]:
            self._fail(job, Aborted("the server is shutting down"))
        for fn, future in self.barriers:
            future.cancel()


def _emit(job, event):
    try:
        job.emit(event)
    except Exception:
        log.debug("dropped an event for a finished client", exc_info=True)
