"""Continuous batching: which sequences run in the next step, and how many of their tokens each computes.

With chunked prefill (the default) a step holds the running sequences' decodes (one token each) and then pieces of
prompts: the step's token budget (max_num_batched_tokens) goes to the decodes first and to prefill pieces after.
A piece ends at a multiple of the chunk size counted from the start of its sequence (or at the sequence's end),
whatever the load, and a prompt longer than long_prefill_token_threshold takes at most that many tokens of a step
when anything else runs or waits, so that queued short prompts prefill in the same step and running decodes keep
their pace. Without chunked prefill each step is either a prefill of whole prompts or one decode token for every
running sequence (prefill first).

When blocks run out, cached prefixes are evicted first, then the most recently admitted sequences are preempted
(their blocks released, their tokens kept) and recomputed later from their tokens. When more sequences run than
max_num_seqs, those of lower fork depth go first (round robin within a depth)."""
from collections import Counter, deque
from collections.abc import Callable
from itertools import chain

from engine.config import EngineConfig
from engine.kv_cache import KVCache
from engine.prefill_pacing import PrefillPacer, StepKind
from engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCache | None) -> None:
        assert config.max_num_batched_tokens is not None and config.long_prefill_token_threshold is not None, \
            "EngineConfig.__post_init__ resolves them"
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.chunked = config.enable_chunked_prefill
        self.long_prefill = config.long_prefill_token_threshold  # 0: no cap
        self.chunk = config.long_prefill_token_threshold or config.max_num_batched_tokens  # pieces end at multiples
        self.kv = kv  # None while the engine sleeps (it schedules nothing then)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted: decoding, or prefilling (part of the prompt computed)
        self.num_preemptions = 0
        self.pacer = PrefillPacer(config.decode_share)  # spaces pieces of prompts longer than the step budget

    def add_waiting(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """For sequences that already hold the KV of their prefix (forks): they decode at the next step."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], int]:
        """(the step's sequences, how many of them lead as decodes); each has num_scheduled_tokens set: 1 for a
        decode, the piece's length for a prefill. A sequence samples in this step when its piece reaches its end."""
        if self.chunked:
            return self._schedule_mixed()
        prefill = self._schedule_prefill()
        if prefill:
            return prefill, 0
        decode = self._schedule_decode(list(self.running), self.max_num_seqs)
        if not decode and self.waiting and not self.running:
            prefill = self._schedule_prefill()
            if not prefill:
                self._pool_too_small()
            return prefill, 0
        return decode, len(decode)

    # ---- chunked prefill: decodes and prefill pieces in one step -----------------------------------------------
    def _schedule_mixed(self) -> tuple[list[Sequence], int]:
        decoding = [s for s in self.running if not s.is_prefilling]
        eligible = self._prefill_candidates(decoding)
        decode = self._schedule_decode(decoding, self.max_num_seqs - len(eligible))
        budget = max(self.max_num_batched_tokens - len(decode), self.chunk)  # at least one chunk of prefill
        pieces: list[Sequence] = []
        long_pending = paced = False
        for i, seq in enumerate(eligible):
            if decoding and self._is_long(seq):
                long_pending = True
                if paced or not self.pacer.allow():
                    continue  # the decodes' share first (one long piece a step); short prompts still prefill
                paced = True
            waiting_others = len(self.waiting) - (seq.status == SequenceStatus.WAITING)
            others = bool(decoding or pieces or i + 1 < len(eligible) or waiting_others)
            if seq.status == SequenceStatus.WAITING:
                if not self._pool().admit(seq):
                    break
                self.waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
            seq.num_scheduled_tokens = self._piece(seq, budget, capped=others and self.long_prefill > 0)
            if not seq.num_scheduled_tokens:
                break
            budget -= seq.num_scheduled_tokens
            pieces.append(seq)
        if not decode and not pieces and self.waiting and not self.running:
            self._pool_too_small()
        self.pacer.scheduled(StepKind(len(decode), len(pieces), any(map(self._is_long, pieces))), long_pending)
        return decode + pieces, len(decode)

    def _is_long(self, seq: Sequence) -> bool:
        """A prompt longer than a step's budget: its pieces are paced beside running decodes."""
        return self.pacer.enabled and len(seq) > self.max_num_batched_tokens

    def observe_step(self, seconds: float) -> None:
        """The wall time from the start of the step schedule() last returned to the next (the pacer's measurement)."""
        self.pacer.observe(seconds)

    def _prefill_candidates(self, decoding: list[Sequence]) -> list[Sequence]:
        """Prefilling sequences, then waiting ones in order, while decode slots allow: a sequence gets a slot
        when fewer than max_num_seqs decoding sequences of its fork depth or lower (and candidates before it)
        hold one, so a waiting root is admitted past running forks."""
        ahead = decode_slots_ahead(decoding)
        eligible: list[Sequence] = []
        for seq in chain((s for s in self.running if s.is_prefilling), self.waiting):
            if ahead(seq) + len(eligible) >= self.max_num_seqs:
                break
            eligible.append(seq)
        return eligible

    def _piece(self, seq: Sequence, budget: int, capped: bool) -> int:
        """Tokens of seq's prompt to compute now: all the rest when it fits the limit, else up to the last
        multiple of the chunk size within it (0 when none is)."""
        start, end = seq.num_cached_tokens, len(seq)
        limit = min(budget, self.long_prefill) if capped else budget
        if end - start <= limit:
            return end - start
        return max(0, (start + limit) // self.chunk * self.chunk - start)

    def _pool(self) -> KVCache:
        if self.kv is None:
            raise RuntimeError("the engine is asleep (sleep() freed its KV pool): call wake_up() first")
        return self.kv

    def _pool_too_small(self) -> None:
        raise RuntimeError(
            f"the KV pool ({self._pool().num_blocks} blocks) cannot hold the next waiting sequence "
            f"({len(self.waiting[0])} tokens): its blocks are held by finished sequences that were "
            f"never freed; call free() on them")

    # ---- without chunked prefill: whole prompts in prefill-only steps ------------------------------------------
    def _schedule_prefill(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        num_tokens = 0
        ahead = decode_slots_ahead(self.running)  # without chunking every running sequence decodes
        while self.waiting:
            seq = self.waiting[0]
            if ahead(seq) + len(scheduled) >= self.max_num_seqs:
                break
            if scheduled and num_tokens + len(seq) > self.max_num_batched_tokens:
                break
            if not self._pool().admit(seq):
                break
            seq.num_scheduled_tokens = len(seq) - seq.num_cached_tokens
            num_tokens += seq.num_scheduled_tokens
            seq.status = SequenceStatus.RUNNING
            scheduled.append(self.waiting.popleft())
        self.running += scheduled
        return scheduled

    # ---- decodes --------------------------------------------------------------------------------------------------
    def _schedule_decode(self, decoding: list[Sequence], slots: int) -> list[Sequence]:
        """Up to `slots` of the decoding sequences, each with room for its next token. Short of blocks, prefilling
        sequences are preempted first (the latest admitted), then decoding ones from the back of the queue."""
        if len(decoding) > slots:
            # Sequences that may still be forked (roots) go first: their forks can only start once they
            # finish, so a root left to wait behind forks stretches the tail of a tree with a half-empty batch.
            decoding.sort(key=lambda seq: seq.fork_depth)  # stable: round robin within a depth
        queue = deque(decoding[:max(slots, 0)])
        scheduled = []
        while queue:
            seq = queue.popleft()
            while not self._pool().reserve_decode(seq):
                victim = next((s for s in reversed(self.running) if s.is_prefilling), None)
                if victim is not None:
                    self._preempt(victim)
                elif queue:
                    self._preempt(queue.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                seq.num_scheduled_tokens = 1
                scheduled.append(seq)
        left_out = [s for s in decoding[max(slots, 0):] if s.status == SequenceStatus.RUNNING]
        others = [s for s in self.running if s.is_prefilling]
        self.running = left_out + scheduled + others  # sequences left out by max_num_seqs go first next time
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self._pool().release(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED


def decode_slots_ahead(decoding: list[Sequence]) -> Callable[[Sequence], int]:
    """For a sequence to admit: how many of `decoding` take a decode slot before it would (those of its fork depth
    or lower: a root is admitted past running forks)."""
    depths = Counter(seq.fork_depth for seq in decoding)
    return lambda seq: sum(n for depth, n in depths.items() if depth <= seq.fork_depth)
