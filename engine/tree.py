"""ETMR tree sampling (docs/algorithms.md section 4) on the engine's radix-tree fork.

All roots of all prompts enter the continuous batch together. The moment a root finishes, its top-N fork
positions are chosen and its B*N branches are forked from its KV cache (full blocks shared, the partial
last block copied, the prefix never prefilled again); they join the running batch at the next step while
other roots are still decoding. A root is freed as soon as its branches hold their own references.

With `branch_after_all_roots` (or a `select_roots` callback) a prompt's roots keep their KV until all M have
finished; then `select_roots(prompt_index, root_leaves)` names the roots to fork (all by default) and the rest
are freed: the engine knows nothing of votes, a caller's vote can decide where branches are worth their tokens.

Noise keys: every sequence of prompt i uses seed_i (the seed of prompt i's SamplingParams, or a random seed
per prompt when None). Root r has seq_id r; branch b at fork f of root r has seq_id M + (r*N + f)*B + b, so roots match
parallel samples 0..M-1 of the same seed and every leaf is reproducible whatever the batch composition.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from engine.progress import Progress
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, per_prompt
from engine.tree_select import fork_positions

if TYPE_CHECKING:  # annotations only: engine.llm imports this module
    from engine.llm import LLM, Prompts

METRICS = ("entropy", "surprisal")


@dataclass
class TreeParams:
    """M trees (roots) per prompt, N fork points per root, B branches per fork point."""
    trees: int = 12
    forks: int = 2
    branches: int = 2
    metric: str = "entropy"   # "entropy": full-vocabulary H_t; "surprisal": -log p(sampled token)
    distinct: bool = False     # each branch's first token differs from the root's token at the fork
    no_fork_after: list[str] | str = field(default_factory=list)  # no fork at or after the first occurrence of
                                                                  # any of these in the root's text (ettrl:
                                                                  # "\\boxed{"); one string is a list of one
    min_gap: int = 1           # fork positions of a root at least this many tokens apart (1: any distinct ones)
    branch_after_all_roots: bool = False  # fork once all M roots of a prompt have finished (see select_roots)

    def __post_init__(self) -> None:
        if self.trees < 1:
            raise ValueError(f"TreeParams.trees must be >= 1, got {self.trees}")
        if self.forks < 0 or self.branches < 0:
            raise ValueError(f"TreeParams.forks and .branches must be >= 0, got {self.forks}, {self.branches}")
        if self.metric not in METRICS:
            raise ValueError(f"TreeParams.metric must be one of {METRICS}, got {self.metric!r}")
        if isinstance(self.no_fork_after, str):
            self.no_fork_after = [self.no_fork_after]
        self.no_fork_after = list(self.no_fork_after)
        if any(not isinstance(m, str) or not m for m in self.no_fork_after):
            raise ValueError(f"TreeParams.no_fork_after must be non-empty strings, got {self.no_fork_after!r}")
        if self.min_gap < 1:
            raise ValueError(f"TreeParams.min_gap must be >= 1 (1: any distinct positions), got {self.min_gap}")

    @property
    def leaves_per_tree(self) -> int:
        return 1 + self.branches * self.forks

    @property
    def num_leaves(self) -> int:
        """M (1 + B N); a root too short to have N allowed fork points gives fewer."""
        return self.trees * self.leaves_per_tree

    def branch_seq_id(self, root: int, fork: int, branch: int) -> int:
        return self.trees + (root * self.forks + fork) * self.branches + branch


@dataclass
class Leaf:
    """One complete response. For a branch, token_ids/logprobs/entropies include the root's prefix."""
    token_ids: list[int]
    text: str | None
    logprobs: list[float]
    entropies: list[float]
    finish_reason: str | None
    root: int
    fork_position: int | None = None  # response index of the resampled token; None for a root
    branch: int | None = None
    seq_id: int = 0
    stop_reason: str | int | None = None  # the stop match or stop token id that ended it (CompletionOutput's)

    @property
    def origin(self) -> tuple[int, int | None, int | None]:
        return self.root, self.fork_position, self.branch


@dataclass
class TreeStats:
    leaves: int = 0
    decoded_tokens: int = 0              # tokens sampled by the roots and branches of this prompt
                                         # (engine decode counter + 1 per root: a root's first token comes
                                         # from the prefill; a branch's first step is a decode step)
    reused_tokens: int = 0               # response tokens branches inherited from their root's KV
    parallel_equivalent_tokens: int = 0  # tokens of all leaves: what n=leaves parallel sampling decodes
    wall_seconds: float = 0.0            # from the call's start until this prompt's last leaf finished

    @property
    def token_ratio(self) -> float:
        return self.decoded_tokens / max(1, self.parallel_equivalent_tokens)


@dataclass
class TreeResult:
    prompt_token_ids: list[int]
    seed: int
    fork_positions: list[list[int]]  # per root, sorted response indices
    leaves: list[Leaf] = field(default_factory=list)
    stats: TreeStats = field(default_factory=TreeStats)


Owner = tuple[Sequence, int, int, int | None, int | None]  # (sequence, prompt, root, fork, branch)
RootSelector = Callable[[int, list[Leaf]], Iterable[int]]  # (prompt index, its M root leaves) -> roots to fork


def sample_tree(llm: LLM, prompts: Prompts, tree_params: TreeParams,
                sampling_params: SamplingParams | list[SamplingParams], use_tqdm: bool = False,
                select_roots: RootSelector | None = None) -> list[TreeResult]:
    """One ETMR tree set per prompt (a string, or a list of token ids). See the module docstring.

    `sampling_params` is one SamplingParams for every prompt or one per prompt (as in `LLM.generate`); give each
    prompt its own seed when the prompts' samples should not share noise. `select_roots(i, roots)` is called once
    per prompt when its M roots have finished (implies `branch_after_all_roots`) and returns the indices of the
    roots to fork.
    """
    prompt_list, params = per_prompt(prompts, sampling_params)
    for p in params:
        if p.n != 1:
            raise ValueError(f"sample_tree takes SamplingParams.n == 1 (the tree size is TreeParams), got n={p.n}")
    prompt_ids = [llm.encode(p) if isinstance(p, str) else list(p) for p in prompt_list]
    seeds = [p.seed if p.seed is not None else random.getrandbits(63) for p in params]
    progress = Progress(llm.engine, len(prompt_ids) * tree_params.num_leaves, "trees", use_tqdm)
    try:
        return TreeRun(llm, tree_params, params, progress, select_roots).run(prompt_ids, seeds)
    finally:
        progress.close()


class TreeRun:
    """One sample_tree call's trees: run() drives the engine's step loop to the end. A caller that owns the step
    loop (engine/serve's engine loop, where many requests share each step) uses the pieces instead: begin(), then
    on_step(finished) after every engine.step() until done, then sorted_results(); abort() frees what is live.
    `owners` maps a live sequence to its place in the trees."""

    def __init__(self, llm: LLM, tree_params: TreeParams, sampling_params: list[SamplingParams], progress: Progress,
                 select_roots: RootSelector | None = None) -> None:
        self.llm, self.engine, self.progress = llm, llm.engine, progress
        self.decode = llm.decode if llm.tokenizer is not None else None
        self.tp, self.params = tree_params, sampling_params  # one SamplingParams per prompt
        self.select_roots = select_roots
        self.defer = tree_params.branch_after_all_roots or select_roots is not None
        self.owners: dict[int, Owner] = {}  # live sequence uid -> (sequence, prompt, root, fork, branch)
        self.held: dict[int, dict[int, tuple[Sequence, Leaf]]] = {}  # deferred: prompt -> root -> finished root

    def run(self, prompt_ids: list[list[int]], seeds: list[int]) -> list[TreeResult]:
        self.begin(prompt_ids, seeds)
        try:
            while self.owners:
                self.on_step(self.engine.step())
        except BaseException:  # leave the engine clean (e.g. after Ctrl-C): no half-built tree holds KV blocks
            self.abort()
            raise
        return self.sorted_results()

    # The pieces of run() for a caller that owns the step loop.
    def begin(self, prompt_ids: list[list[int]], seeds: list[int]) -> None:
        """Queues every prompt's M roots (validated before any is queued)."""
        self.results = [TreeResult(ids, seed, [[] for _ in range(self.tp.trees)])
                        for ids, seed in zip(prompt_ids, seeds)]
        self.live = [self.tp.trees] * len(prompt_ids)
        requests = [self.engine.make_sequences(ids, replace(p, n=self.tp.trees), seed)  # M siblings, one prefill
                    for ids, p, seed in zip(prompt_ids, self.params, seeds)]
        self.start = time.perf_counter()
        for i, roots in enumerate(requests):
            self.owners.update((seq.uid, (seq, i, r, None, None)) for r, seq in enumerate(roots))
            self.engine.add_sequence(roots[0])

    def on_step(self, finished: list[Sequence]) -> None:
        """Takes this run's sequences among a step's finished ones (records them, forks roots' branches)."""
        for seq in finished:
            if seq.uid in self.owners:
                self._on_finished(seq)

    @property
    def done(self) -> bool:
        return not self.owners

    def abort(self) -> None:
        """Frees every live sequence of this run (and roots held for a later fork)."""
        for seq, *_ in list(self.owners.values()):
            self.engine.free(seq)
        for roots in self.held.values():
            for seq, _ in roots.values():
                self.engine.free(seq)
        self.owners.clear()
        self.held.clear()

    def sorted_results(self) -> list[TreeResult]:
        for result in self.results:
            result.leaves.sort(key=lambda leaf: (leaf.root, leaf.fork_position or 0, leaf.branch or 0))
        return self.results

    def _on_finished(self, seq: Sequence) -> None:
        _, i, r, f, b = self.owners.pop(seq.uid)
        result = self.results[i]
        leaf = self._leaf(seq, r, None if f is None else result.fork_positions[r][f], b)
        result.leaves.append(leaf)
        self._account(result.stats, leaf)
        if f is not None or not self.defer:
            if f is None:
                self._fork_branches(seq, i, r, leaf)
            self.engine.free(seq)
        else:
            roots = self.held.setdefault(i, {})
            roots[r] = (seq, leaf)
            if len(roots) == self.tp.trees:
                self._fork_selected_roots(i, self.held.pop(i))
        self.progress.update()
        self.live[i] -= 1
        if self.live[i] == 0:
            result.stats.wall_seconds = time.perf_counter() - self.start

    def _fork_selected_roots(self, i: int, roots: dict[int, tuple[Sequence, Leaf]]) -> None:
        """All M roots of prompt i have finished: fork the chosen ones, free them all."""
        try:
            chosen = set(range(self.tp.trees))
            if self.select_roots is not None:
                leaves = [roots[r][1] for r in range(self.tp.trees)]
                chosen = {int(r) for r in self.select_roots(i, leaves)}
                if not chosen <= set(range(self.tp.trees)):
                    raise ValueError(f"select_roots returned {sorted(chosen)} for prompt {i}; "
                                     f"root indices are 0..{self.tp.trees - 1}")
            for r in range(self.tp.trees):
                if r in chosen:
                    self._fork_branches(roots[r][0], i, r, roots[r][1])
                else:
                    self.progress.shrink(self.tp.forks * self.tp.branches)
        finally:
            for seq, _ in roots.values():
                self.engine.free(seq)

    def _fork_branches(self, root: Sequence, i: int, r: int, leaf: Leaf) -> None:
        """B branches at each of the root's top-N positions; they decode from the next step on."""
        metric = leaf.entropies if self.tp.metric == "entropy" else [-lp for lp in leaf.logprobs]
        positions = fork_positions(metric, leaf.token_ids, self.tp.forks, self.decode, self.tp.no_fork_after,
                                   self.tp.min_gap)
        result = self.results[i]
        result.fork_positions[r] = positions
        self.progress.shrink((self.tp.forks - len(positions)) * self.tp.branches)
        for f, t in enumerate(positions):
            exclude = leaf.token_ids[t] if self.tp.distinct else None
            for b in range(self.tp.branches):
                child = self.engine.fork(root, root.num_prompt_tokens + t, self.params[i], result.seed,
                                         self.tp.branch_seq_id(r, f, b), exclude_token=exclude)
                self.owners[child.uid] = (child, i, r, f, b)
                self.live[i] += 1

    def _leaf(self, seq: Sequence, root: int, fork_position: int | None, branch: int | None) -> Leaf:
        """A fork inherits its parent's tokens, logprobs and entropies up to the fork: the leaf is the whole
        response."""
        out = self.llm._completion(seq)
        return Leaf(out.token_ids, out.text, list(out.logprobs), list(out.entropies), out.finish_reason,
                    root, fork_position, branch, seq.seq_id, out.stop_reason)

    @staticmethod
    def _account(stats: TreeStats, leaf: Leaf) -> None:
        reused = leaf.fork_position or 0
        stats.leaves += 1
        stats.decoded_tokens += len(leaf.token_ids) - reused
        stats.reused_tokens += reused
        stats.parallel_equivalent_tokens += len(leaf.token_ids)
