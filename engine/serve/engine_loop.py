"""The engine loop: one thread owns the engine; HTTP handlers submit jobs and await their events.

Every job's sequences (engine/serve/jobs.py) join one continuous batch (LLMEngine.step). A job reports through
`emit(event)`, a thread-safe callback the handler gives it: ("delta", [...]) after each step for streaming jobs, then
("done", result) or ("error", (http_status, message)). Everything that touches the engine runs on this thread:
submissions, aborts (a client that disconnects frees its sequences' KV blocks here), and "barriers", functions
run only when no job is in flight (weight updates, cache resets, pause): while one waits, new jobs are held.

Noise is keyed by (seed, seq_id, position) with seq_id = sample index within its request, so a request's
tokens do not depend on the other requests in the batch. A step that raises is confined to the requests that
make it fail: every job's sequences are parked (out of the batch, their tokens and decode KV kept), each job that
was in the step runs alone until each of its sequences has sampled one more token, a job whose step raises fails
alone (500), and the others go on where they were, sampling what they would have. A one-token canary then says
whether the model still gives finite logits (`healthy`, GET /health).
"""
from __future__ import annotations

import concurrent.futures
import logging
import math
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, SequenceStatus
from engine.serve.jobs import Event, Job

if TYPE_CHECKING:  # annotations only
    from engine.llm import LLM

log = logging.getLogger("engine.serve")
IDLE_POLL_S = 0.5
PROBE_STEPS = 64    # a job alone after a failed step: at most this many steps for each sequence to sample a token
IfBusy = Literal["wait", "refuse"]
PauseMode = Literal["wait", "abort"]
Future = concurrent.futures.Future


class Busy(RuntimeError):
    """A state-changing call refused because requests are in flight (the caller asked not to wait)."""


class Aborted(RuntimeError):
    """A job aborted by the server (/pause?mode=abort, shutdown)."""


class EngineLoop:
    def __init__(self, llm: LLM) -> None:
        self.llm, self.engine = llm, llm.engine
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.active: list[Job] = []            # jobs whose sequences are in the engine
        self.held: deque[Job] = deque()        # submitted, not yet admitted (paused, or a barrier waits)
        self.barriers: deque[tuple[Callable[[], Any], Future[Any]]] = deque()  # to run once no job is in flight
        self.paused = False
        self.healthy = True                    # the model gave finite logits at the last canary
        self._stopping = False
        self.num_steps = 0
        self._queued: set[Job] = set()         # submitted jobs none of whose sequences has been scheduled yet
        self._queued_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # ---- called from any thread ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._queued_lock:
            self._queued.add(job)
        self._inbox.put(("submit", job))

    def abort(self, job: Job) -> None:
        self._inbox.put(("abort", job))

    @property
    def num_queued(self) -> int:
        """Jobs submitted whose sequences have not started (held, or waiting in the engine's queue)."""
        return len(self._queued)

    def barrier(self, fn: Callable[[], Any], if_busy: IfBusy = "wait") -> Future[Any]:
        """Runs fn() on the loop thread once no job is in flight; new jobs wait meanwhile. if_busy="refuse":
        fails at once with Busy when jobs are in flight (or held)."""
        future: Future[Any] = Future()
        self._inbox.put(("barrier", (fn, future, if_busy)))
        return future

    def pause(self, mode: PauseMode) -> Future[None]:
        """mode "wait": new jobs are held and the future resolves when the jobs in flight have finished;
        "abort": the jobs in flight are aborted (their clients get an error) and held jobs stay held."""
        future: Future[None] = Future()
        self._inbox.put(("pause", (mode, future)))
        return future

    def resume(self) -> Future[None]:
        future: Future[None] = Future()
        self._inbox.put(("resume", future))
        return future

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # ---- the loop thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._drain(block=not self._has_work())
            self._run_barriers()
            self._admit()
            if self.active:
                self._step()
        self._shutdown()

    def _has_work(self) -> bool:
        return bool(self.active or self.barriers or (self.held and not self.paused))

    def _drain(self, block: bool) -> None:
        try:
            message = self._inbox.get(timeout=IDLE_POLL_S) if block else self._inbox.get_nowait()
            while True:
                self._handle(*message)
                message = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _handle(self, kind: str, payload: Any) -> None:
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

    def _run_barriers(self) -> None:
        while self.barriers and not self.active:
            fn, future = self.barriers.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - reported to the caller
                    future.set_exception(e)

    def _admit(self) -> None:
        while self.held and not self.paused and not self.barriers:
            job = self.held.popleft()
            try:
                job.start(self.engine)
            except Exception as e:  # noqa: BLE001 - a request the engine refuses fails alone
                job.abort(self.engine)
                self._unqueue(job)
                _emit(job, ("error", (400, str(e))))
                continue
            self.active.append(job)

    def _step(self) -> None:
        try:
            finished = self.engine.step()
        except Exception as e:  # noqa: BLE001 - confined to the jobs that cause it
            log.exception("engine step failed; running each request alone to find the ones that make it fail")
            self._recover(e)
            return
        self._after_step(finished)

    def _after_step(self, finished: list[Sequence]) -> None:
        self.num_steps += 1
        for job in list(self.active):
            job.on_step(self.engine, finished)
            if job in self._queued and _started(job):
                self._unqueue(job)
            if job.stream:
                deltas = job.deltas()
                if deltas:
                    _emit(job, ("delta", deltas))
            if job.done:
                self.active.remove(job)
                self._unqueue(job)
                _emit(job, ("done", job.result()))

    # ---- after a failed step ------------------------------------------------------------------------------
    def _recover(self, error: Exception) -> None:
        """Parks every job, runs each one that was in the failed step alone until each of its sequences sampled
        a token (or it ended): a job whose step raises fails alone; the others go on where they were."""
        unreported = list(self.engine.finished.values())  # finished by the failed step before it raised
        if unreported:
            self._after_step(unreported)
        in_step = {seq.uid for seq in self.engine.scheduler.running}
        suspects = [job for job in self.active if any(seq.uid in in_step for seq in job.sequences())]
        for job in self.active:
            self._park(job)
        for job in suspects:
            if job not in self.active:
                continue
            try:
                self._run_alone(job)
            except Exception as e:  # noqa: BLE001 - this job's sequences make the step fail
                log.warning("a request fails the engine step alone; failing it: %s: %s", type(e).__name__, e)
                self._fail(job, e, status=500)
                continue
            if job in self.active:
                self._park(job)
        if not self.check_health():
            log.error("the model no longer gives finite logits (after %s: %s); /health answers 503",
                      type(error).__name__, error)
        for job in self.active:
            self._unpark(job)

    def _park(self, job: Job) -> None:
        for seq in job.sequences():
            self.engine.park(seq)

    def _unpark(self, job: Job) -> None:
        for seq in job.sequences():
            self.engine.unpark(seq)

    def _run_alone(self, job: Job) -> None:
        seqs = job.sequences()
        marks = {seq.uid: len(seq) for seq in seqs}
        self._unpark(job)
        for _ in range(PROBE_STEPS):
            if job.done or all(seq.is_finished or len(seq) > marks[seq.uid] for seq in seqs):
                return
            self._after_step(self.engine.step())

    def check_health(self) -> bool:
        """Runs the canary and records what it says in `healthy` (on the loop thread: in a barrier)."""
        self.healthy = self.canary()
        return self.healthy

    def canary(self) -> bool:
        """One greedy token of a one-token prompt, alone: True when it comes with finite statistics. Runs on
        the loop thread with no other sequence in the engine (after a failed step, after a weight update)."""
        if self.engine.asleep:
            return self.healthy
        seq = self.engine.make_sequences([0], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))[0]
        try:
            self.engine.add_sequence(seq)
            for _ in range(PROBE_STEPS):
                if seq.is_finished:
                    break
                self.engine.step()
            return seq.is_finished and all(map(math.isfinite, [*seq.logprobs, *seq.entropies]))
        except Exception:  # noqa: BLE001 - a model that cannot take a step is unhealthy
            log.exception("the health canary failed")
            return False
        finally:
            self.engine.free(seq)

    # ---- ending jobs ----------------------------------------------------------------------------------------
    def _unqueue(self, job: Job) -> None:
        with self._queued_lock:
            self._queued.discard(job)

    def _abort(self, job: Job) -> None:
        self._unqueue(job)
        if job in self.held:
            self.held.remove(job)
        elif job in self.active:
            self.active.remove(job)
            job.abort(self.engine)

    def _fail(self, job: Job, error: BaseException, status: int = 503) -> None:
        self._abort(job)
        _emit(job, ("error", (status, f"{type(error).__name__}: {error}")))

    def _shutdown(self) -> None:
        for job in [*self.active, *self.held]:
            self._fail(job, Aborted("the server is shutting down"))
        for fn, future in self.barriers:
            future.cancel()


def _started(job: Job) -> bool:
    """Some sequence of the job has been scheduled (it holds KV, runs or has finished)."""
    return any(seq.status is not SequenceStatus.WAITING for seq in job.sequences()) or job.done


def _emit(job: Job, event: Event) -> None:
    try:
        job.emit(event)
    except Exception:
        log.debug("dropped an event for a finished client", exc_info=True)
