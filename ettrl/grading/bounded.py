"""Run a symbolic comparison under a wall-clock bound, from any thread.

Main thread: an interval timer (SIGALRM) raises `ComparisonTimeout` inside the computation. It derives from
BaseException so that library code catching `Exception` cannot swallow it.
Other threads (and platforms without SIGALRM): signals are unavailable, so the comparison runs in a
long-lived helper process (`python -m ettrl.grading._worker`), which is killed and restarted when it
overruns. Both paths return `default` on timeout.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
D = TypeVar("D")

WORKER_START_TIMEOUT_S = 120.0


class ComparisonTimeout(BaseException):
    pass


def can_use_alarm() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _raise_timeout(signum, frame):
    raise ComparisonTimeout


def run_with_alarm(fn: Callable[..., T], args: tuple, seconds: float, default: D) -> T | D:
    """fn(*args), or `default` if it runs past `seconds`. Main thread only. A timer the caller had armed
    keeps its remaining time (less the time spent here)."""
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    start = time.monotonic()
    outer_delay = 0.0
    try:
        outer_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except ComparisonTimeout:
        return default
    finally:
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:
            signal.setitimer(signal.ITIMER_REAL, max(outer_delay - (time.monotonic() - start), 1e-3))


class WorkerProcess:
    """One helper process shared by all non-main threads; requests are serialised by a lock.

    `call(args, seconds, default)` sends the JSON list `args` and returns the JSON reply, or `default` if
    none arrives within `seconds` (the process is then killed; the next call starts a fresh one)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._owner_pid = os.getpid()

    def call(self, args: tuple, seconds: float, default: Any) -> Any:
        with self._lock:
            try:
                proc = self._ensure_started()
                assert proc.stdin is not None and proc.stdout is not None, "started with pipes"
                proc.stdin.write(json.dumps(list(args)) + "\n")
                proc.stdin.flush()
                if not _readable(proc.stdout, seconds):
                    self._kill()
                    return default
                reply = proc.stdout.readline()
                return json.loads(reply) if reply else default
            except (OSError, ValueError):
                self._kill()
                return default

    def _ensure_started(self) -> subprocess.Popen[str]:
        if self._owner_pid != os.getpid():  # forked: the helper and its pipes belong to the parent
            self._proc, self._owner_pid = None, os.getpid()
        if self._proc is None or self._proc.poll() is not None:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            self._proc = proc = subprocess.Popen(
                [sys.executable, "-m", "ettrl.grading._worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True, bufsize=1, env=env)
            assert proc.stdout is not None, "started with pipes"
            if not _readable(proc.stdout, WORKER_START_TIMEOUT_S) or proc.stdout.readline() != "ready\n":
                self._kill()
                raise OSError("grading worker failed to start")
        return self._proc

    def _kill(self):
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


def _readable(stream, seconds: float) -> bool:
    ready, _, _ = select.select([stream], [], [], seconds)
    return bool(ready)


WORKER = WorkerProcess()
