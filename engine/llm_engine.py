"""LLMEngine: sequences in, one batched step at a time, finished sequences out. The low-level API that
generate() and tree sampling are built on.

    engine.add_sequence(seq)        # queue a sequence (prompt tokens, params, noise key)
    finished = engine.step()        # decodes and prompt pieces; returns the sequences that finished in it
    child = engine.fork(parent, position, params, seed, seq_id, exclude_token=None)
    engine.free(seq)                # release a finished (or abandoned) sequence's KV blocks

Finished sequences keep their KV blocks until free(), so a finished root can still be forked.
"""
from __future__ import annotations

import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.config import EngineConfig
from engine.kv_cache import KVCache, cdiv
from engine.model_runner import ModelRunner
from engine.models.loader import NamedTensors
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from engine.step_tensors import to_device
from engine.stop_checker import TextStop
from ettrl_kernels import entropy_sample

if TYPE_CHECKING:  # annotations only: transformers loads with the model's tokenizer
    from transformers import PreTrainedTokenizerBase

WAKE_UP_TAGS = ("weights", "kv_cache")  # vLLM's sleep-mode tags, in the order wake_up() restores them


class LLMEngine:
    def __init__(self, config: EngineConfig, model_dir: Path, tokenizer: PreTrainedTokenizerBase | None = None,
                 eos_token_ids: Iterable[int] = ()) -> None:
        self.config = config
        self.runner = ModelRunner(config, model_dir)
        self.kv: KVCache | None = self.runner.kv  # None while asleep
        self.scheduler = Scheduler(config, self.kv)
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = self.runner.max_model_len
        self.finished: dict[int, Sequence] = {}  # finished but not yet freed, by uid
        self.num_prefill_tokens = 0   # tokens computed as prompt pieces (prompts, recomputation after preemption)
        self.num_decode_tokens = 0    # tokens computed as decodes (one per running sequence per step)
        self.num_steps = 0
        self.step_started: float | None = None  # perf_counter at the start of the last step, None after an idle one

    # ---- submitting ---------------------------------------------------------------------------------------
    def make_sequences(self, prompt_token_ids: list[int], params: SamplingParams,
                       seed: int | None = None) -> list[Sequence]:
        """The n samples of one request: sample j has the noise key (seed, j). Seed None -> params.seed or random."""
        if seed is None:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
        seqs = [Sequence(prompt_token_ids, params, seed, seq_id=j) for j in range(params.n)]
        self._check_fits(seqs[0])
        seqs[0].pending_siblings = seqs[1:]  # they start from the first one's prefill logits
        return seqs

    def add_sequence(self, seq: Sequence) -> None:
        """Queues a sequence (and its pending n>1 siblings) for prefill."""
        self._check_fits(seq)
        self.scheduler.add_waiting(seq)

    def _check_fits(self, seq: Sequence) -> None:
        kv = self._check_awake()
        if (seq.params.stop or seq.params.stop_regex) and self.tokenizer is None:
            raise ValueError("stop strings and stop_regex need a tokenizer and this model has none; use stop_token_ids")
        if not seq.token_ids:
            raise ValueError("empty prompt: give at least one token")
        vocab = self.runner.args.vocab_size
        if min(seq.token_ids) < 0 or max(seq.token_ids) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}), got a prompt with ids outside it")
        if seq.params.top_k > vocab:
            raise ValueError(f"top_k must be at most the vocabulary size {vocab} (or -1: off), got {seq.params.top_k}")
        if len(seq) >= self.max_model_len:
            raise ValueError(f"sequence of {len(seq)} tokens does not fit the model's max length "
                             f"{self.max_model_len} with one token to generate; shorten the prompt")
        final_len = min(seq.num_prompt_tokens + seq.params.max_tokens, self.max_model_len)
        need = cdiv(final_len, kv.block_size)
        if need > kv.num_blocks:
            raise ValueError(f"a sequence of up to {final_len} tokens needs {need} KV blocks but the pool has "
                             f"{kv.num_blocks}; lower max_tokens or enlarge the KV cache")

    # ---- forking --------------------------------------------------------------------------------------------
    def fork(self, parent: Sequence, position: int, params: SamplingParams, seed: int, seq_id: int,
             exclude_token: int | None = None) -> Sequence:
        """A child with tokens parent.token_ids[:position] that samples the token at `position` anew.

        It shares the parent's KV blocks of tokens[:position - 1] (copy-on-write for a partially shared block),
        joins the running batch, and its first step is a decode step on token position - 1: no prefill.
        When more sequences run than max_num_seqs, a fork yields to its ancestors' generation (fork_depth).
        exclude_token forbids one token at `position` (distinct branches).
        """
        if parent.status == SequenceStatus.WAITING or not parent.block_table and position > 1:
            raise ValueError(f"cannot fork {parent}: it holds no KV blocks (waiting, preempted or freed)")
        if not parent.num_prompt_tokens <= position <= len(parent):
            raise ValueError(f"fork position must be in [{parent.num_prompt_tokens}, {len(parent)}] "
                             f"(prompt end .. sequence length), got {position}")
        if position - 1 > parent.num_cached_tokens:
            raise ValueError(f"{parent} has KV for {parent.num_cached_tokens} tokens; cannot fork at {position}")
        child = Sequence(parent.token_ids[:position], params, seed, seq_id, parent.num_prompt_tokens)
        child.logprobs = parent.logprobs[:position - parent.num_prompt_tokens]
        child.entropies = parent.entropies[:position - parent.num_prompt_tokens]
        child.exclude_token = -1 if exclude_token is None else exclude_token
        if params.stop or params.stop_regex:  # the text so far, read once (the parent's when it has the same stops)
            same = parent.text_stop is not None and parent.text_stop.patterns is params.stop_patterns
            base = parent.text_stop if same and parent.text_stop is not None else self._new_text_stop(
                params, parent.num_prompt_tokens)
            child.text_stop = base.fork(child.token_ids, position - parent.num_prompt_tokens)
        child.parent_uid, child.fork_position, child.request_id = parent.uid, position, parent.request_id
        child.fork_depth = parent.fork_depth + 1
        self._check_fits(child)
        self._pool().share_prefix(parent, child, position - 1)
        self.scheduler.add_running(child)
        return child

    def free(self, seq: Sequence) -> None:
        """Releases a sequence's KV blocks (its full blocks stay in the prefix cache). Aborts it if unfinished."""
        if seq.status == SequenceStatus.WAITING and seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)
        elif seq.status == SequenceStatus.RUNNING:
            self.scheduler.running.remove(seq)
        self.finished.pop(seq.uid, None)
        if seq.block_table:
            self._pool().release(seq)
        seq.status = SequenceStatus.FINISHED

    def park(self, seq: Sequence) -> None:
        """Takes an unfinished sequence out of the batch, keeping its tokens, until unpark(seq). One ready to
        decode keeps its KV blocks; any other (waiting, or part way through its prefill) releases them (full ones
        stay in the prefix cache) and is prefilled again, alone (no pending siblings). Its noise keys make it
        sample what it would have."""
        if seq.status == SequenceStatus.RUNNING and seq.num_cached_tokens == len(seq) - 1:
            self.scheduler.running.remove(seq)
            return
        self.free(seq)
        seq.status, seq.pending_siblings = SequenceStatus.WAITING, []

    def unpark(self, seq: Sequence) -> None:
        if seq.block_table:
            self.scheduler.add_running(seq)
        else:
            self.add_sequence(seq)

    # ---- stepping -------------------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[Sequence]:
        """One step: the running sequences' decodes and pieces of prompts (chunked prefill), or a prefill or a
        decode step (without it). Returns the sequences that finished in it."""
        now = time.perf_counter()
        if self.step_started is not None:  # the last step's cycle, the caller's work after it included
            self.scheduler.observe_step(now - self.step_started)  # (what running decodes wait for per token)
        seqs, num_decodes = self.scheduler.schedule()
        self.step_started = now if seqs else None
        if not seqs:
            return []
        self.num_decode_tokens += num_decodes
        self.num_prefill_tokens += sum(s.num_scheduled_tokens for s in seqs[num_decodes:])
        self.num_steps += 1
        logits = self.runner.run(seqs)  # rows of the sequences whose step reaches their last token
        done = []
        for seq in seqs:
            if seq.num_cached_tokens + seq.num_scheduled_tokens == len(seq):
                done.append(seq)
            else:  # a prompt piece: nothing to sample yet
                seq.num_cached_tokens += seq.num_scheduled_tokens
        seqs = done
        if not seqs:
            return []
        rows = [(seq, i) for i, seq in enumerate(seqs)]
        for i, seq in enumerate(seqs):
            rows += [(sib, i) for sib in seq.pending_siblings]
        tokens, logprobs, entropies = self._sample(logits, rows)
        self._record_top_logprobs(logits, rows, tokens)
        finished = []
        for (seq, i), token, logprob, entropy in zip(rows, tokens, logprobs, entropies):
            if seq is not seqs[i]:  # an n>1 sibling: it starts from the first sample's prompt KV
                self._pool().share_prefix(seqs[i], seq, len(seq))
                self.scheduler.add_running(seq)
            else:
                seq.num_cached_tokens = len(seq)
            seq.append(token, logprob, entropy)
            seq.exclude_token = -1
            if self._check_finished(seq):
                self.scheduler.finish(seq)
                self.finished[seq.uid] = seq
                finished.append(seq)
        for seq in seqs:
            seq.pending_siblings = []
        return finished

    def _sample(self, logits: torch.Tensor, rows: list[tuple[Sequence, int]]
                ) -> tuple[list[int], list[float], list[float]]:
        seqs = [s for s, _ in rows]
        siblings = len(rows) != logits.shape[0]
        top_k, seeds, seq_ids, positions, exclude, row_index = to_device(
            logits.device, torch.int64, [s.params.top_k for s in seqs], [s.seed for s in seqs],
            [s.seq_id for s in seqs], [len(s) for s in seqs], [s.exclude_token for s in seqs],
            [i for _, i in rows] if siblings else [])
        temperature, top_p = to_device(logits.device, torch.float32, [s.params.temperature for s in seqs],
                                       [s.params.top_p for s in seqs])
        if siblings:
            logits = logits[row_index]
        tokens, logprobs, entropies = entropy_sample(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                                     seeds=seeds, seq_ids=seq_ids, positions=positions,
                                                     exclude=exclude)
        columns = torch.stack([tokens.double(), logprobs.double(), entropies.double()]).tolist()  # one read
        return [int(t) for t in columns[0]], columns[1], columns[2]

    @staticmethod
    def _record_top_logprobs(logits: torch.Tensor, rows: list[tuple[Sequence, int]], tokens: list[int]) -> None:
        """Rows whose params ask for logprobs (alternatives, or another distribution than the sampler's)."""
        for (seq, i), token in zip(rows, tokens):
            p = seq.params
            if p.logprobs is None:
                continue
            x = logits[i].float()
            if p.logprobs_mode == "processed_logprobs" and not p.greedy:
                x = x * (1.0 / p.temperature)
            logp = torch.log_softmax(x, -1)
            top = logp.topk(min(p.logprobs, logp.numel())) if p.logprobs else None
            seq.top_logprobs.append((float(logp[token]), list(zip(top.indices.tolist(), top.values.tolist()))
                                     if top is not None else []))

    def _check_finished(self, seq: Sequence) -> bool:
        """EOS, then stop tokens, then stop strings / stop_regex (stop_reason: the token id or the matched text),
        then the length limits."""
        p, token = seq.params, seq.token_ids[-1]
        if not p.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif (p.stop or p.stop_regex) and (text_stop := self._text_stop(seq)).step(seq.token_ids):
            seq.finish_reason, seq.stop_reason = "stop", text_stop.matched
        elif seq.num_completion_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    def _text_stop(self, seq: Sequence) -> TextStop:
        if seq.text_stop is None:
            seq.text_stop = self._new_text_stop(seq.params, seq.num_prompt_tokens)
        return seq.text_stop

    def _new_text_stop(self, params: SamplingParams, num_prompt_tokens: int) -> TextStop:
        """For params with stop strings or stop_regex (so their patterns are set)."""
        assert params.stop_patterns is not None, "no stop strings or stop_regex"
        return TextStop(params.stop_patterns, self._decode, num_prompt_tokens)

    def _decode(self, token_ids: list[int]) -> str:
        assert self.tokenizer is not None, "stop strings need a tokenizer (_check_fits refuses them without one)"
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ---- state ------------------------------------------------------------------------------------------------
    def live_sequences(self) -> list[Sequence]:
        return [*self.scheduler.running, *self.finished.values()]

    def num_live_sequences(self) -> int:
        """Sequences whose KV is or will be in the pool: waiting, running, and finished but not freed."""
        return len(self.scheduler.waiting) + len(self.scheduler.running) + len(self.finished)

    def check_integrity(self) -> None:
        if self.kv is not None:
            self.kv.check_integrity(self.live_sequences())

    def reset_prefix_cache(self) -> None:
        """Empties the prefix cache (blocks held by live sequences stay); refused while asleep (no pool)."""
        self._pool().reset_prefix_cache()

    def update_weights(self, named_tensors: NamedTensors) -> int:
        live = self.num_live_sequences()
        if live:
            raise RuntimeError(f"update_weights with {live} live sequences: their KV was computed with the old "
                               f"weights; finish and free() them first")
        written = self.runner.update_weights(named_tensors)
        if self.kv is not None:  # asleep: the pool comes back empty
            self.kv.reset_prefix_cache()
        return written

    # ---- sleep mode ---------------------------------------------------------------------------------------
    @property
    def asleep(self) -> bool:
        """No KV pool (sleep() freed it; wake_up() or wake_up(["kv_cache"]) re-creates it)."""
        return self.runner.asleep

    def sleep(self, level: int = 1) -> None:
        """Frees the KV pool (the prefix cache with it); level 2 also moves the weights to CPU memory (GPU only).
        Refused while sequences are live: their KV would be lost."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 (free the KV pool) or 2 (also offload the weights), got {level}")
        live = self.num_live_sequences()
        if live:
            raise RuntimeError(f"sleep() with {live} live sequences (waiting, running, or finished and not freed): "
                               f"their KV cache would be lost; finish and free() them first")
        self.runner.sleep(offload_weights=level == 2)
        self.kv = self.scheduler.kv = None

    def wake_up(self, tags: list[str] | None = None) -> None:
        """What sleep() gave back, as vLLM's tags name it: "weights" (offloaded at level 2) and "kv_cache" (a new,
        empty pool of the same size); None is both. Weights come back first, so a trainer can wake them, write new
        ones and only then re-create the pool. Each part first checks that it fits in the device's free memory and
        raises DeviceMemoryError (still asleep) when it does not."""
        woken = wake_up_tags(tags)
        if "weights" in woken:
            self.runner.wake_up_weights()
        if "kv_cache" in woken:
            self.runner.wake_up_kv_cache()
            self.kv = self.scheduler.kv = self.runner.kv

    def _check_awake(self) -> KVCache:
        """The KV pool, or a clear error when the engine sleeps."""
        kv = self._pool()
        if self.runner.weights_offloaded:
            raise RuntimeError("the engine's weights are offloaded (sleep(level=2)): call wake_up() or "
                               "wake_up(['weights']) first")
        return kv

    def _pool(self) -> KVCache:
        if self.kv is None:
            raise RuntimeError("the engine is asleep (sleep() freed its KV pool): call wake_up() first")
        return self.kv


def wake_up_tags(tags: Iterable[str] | None) -> tuple[str, ...]:
    """wake_up's tags, checked: None -> every tag, in the order they wake (weights before the KV pool)."""
    if tags is None:
        return WAKE_UP_TAGS
    if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
        raise TypeError(f"wake_up tags must be a list of names from {list(WAKE_UP_TAGS)} (or None), got {tags!r}")
    unknown = sorted(set(tags) - set(WAKE_UP_TAGS))
    if unknown:
        raise ValueError(f"unknown wake_up tags {unknown}: use {list(WAKE_UP_TAGS)} or None (both)")
    return tuple(t for t in WAKE_UP_TAGS if t in tags)
