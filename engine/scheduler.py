"""Continuous batching: each step is either a prefill of waiting sequences or one decode token for every running
one. When blocks run out, cached prefixes are evicted first, then the most recently admitted sequences are
preempted (their blocks released, their tokens kept) and recomputed later from their tokens. When more sequences
run than max_num_seqs, those of lower fork depth decode first (round robin within a depth)."""
from collections import deque

from engine.config import EngineConfig
from engine.kv_cache import KVCache
from engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCache):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add_waiting(self, seq: Sequence):
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence):
        """For sequences that already hold the KV of their prefix (forks): they decode at the next step."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns (sequences to run, is_prefill)."""
        prefill = self._schedule_prefill()
        if prefill:
            return prefill, True
        decode = self._schedule_decode()
        if not decode and self.waiting and not self.running:
            prefill = self._schedule_prefill()
            if not prefill:
                raise RuntimeError(
                    f"the KV pool ({self.kv.num_blocks} blocks) cannot hold the next waiting sequence "
                    f"({len(self.waiting[0])} tokens): its blocks are held by finished sequences that were "
                    f"never freed; call free() on them")
            return prefill, True
        return decode, False

    def _schedule_prefill(self) -> list[Sequence]:
        scheduled, num_tokens = [], 0
        while self.waiting:
            seq = self.waiting[0]
            if self._num_decoding_before(seq) + len(scheduled) >= self.max_num_seqs:
                break
            if scheduled and num_tokens + len(seq) > self.max_num_batched_tokens:
                break
            if not self.kv.admit(seq):
                break
            num_tokens += len(seq) - seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            scheduled.append(self.waiting.popleft())
        self.running += scheduled
        return scheduled

    def _num_decoding_before(self, seq: Sequence) -> int:
        """Running sequences that take a decode slot before `seq` would (a root is admitted past forks)."""
        return sum(1 for other in self.running if other.fork_depth <= seq.fork_depth)

    def _schedule_decode(self) -> list[Sequence]:
        if len(self.running) > self.max_num_seqs:
            # Sequences that may still be forked (roots) go first: their forks can only start once they
            # finish, so a root left to wait behind forks stretches the tail of a tree with a half-empty batch.
            self.running.sort(key=lambda seq: seq.fork_depth)  # stable: round robin within a depth
        queue = deque(self.running[:self.max_num_seqs])
        rest = self.running[self.max_num_seqs:]
        scheduled = []
        while queue:
            seq = queue.popleft()
            while not self.kv.reserve_decode(seq):
                if queue:
                    self._preempt(queue.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                scheduled.append(seq)
        self.running = rest + scheduled  # sequences left out by max_num_seqs go first next time
        return scheduled

    def _preempt(self, seq: Sequence):
        self.kv.release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence):
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
