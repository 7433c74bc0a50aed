"""ETTRL's rollout options, read from verl's `actor_rollout_ref.rollout.engine_kwargs.ettrl` (a free-form dict).

    engine_kwargs:
      ettrl:
        trees: 4          # M roots a prompt; 0 (the default): plain parallel sampling, rollout.n a prompt
        forks: 2          # N fork points a root
        branches: 2       # B branches a fork point; rollout.n must be M (1 + N B)
        metric: surprisal   # or entropy
        distinct: false   # a branch's first token differs from its root's
        seed: null        # an int: group g of step s samples with seed + s * 2**20 + g (reproducible runs)
        engine: {}        # more engine.LLM options (kv_cache_memory_gb, max_num_seqs, attention_backend, ...)
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from engine import TreeParams

if TYPE_CHECKING:  # annotations only (Any where verl is not installed)
    from verl.workers.config import RolloutConfig

STEP_SEED_STRIDE = 2**20  # groups a step can hold before two steps' seeds could meet


@dataclass
class EttrlRolloutOptions:
    trees: int = 0
    forks: int = 2
    branches: int = 2
    metric: str = "surprisal"
    distinct: bool = False
    seed: int | None = None
    engine: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.trees < 0:
            raise ValueError(f"engine_kwargs.ettrl.trees must be >= 0 (0: parallel sampling), got {self.trees}")
        if self.trees:
            self.tree_params()  # validates forks, branches, metric

    def tree_params(self) -> TreeParams | None:
        if not self.trees:
            return None
        return TreeParams(self.trees, self.forks, self.branches, self.metric, self.distinct)

    def group_size(self, rollout_n: int) -> int:
        """Responses a prompt gets: the trees' leaves, which must be verl's rollout.n (it repeats each prompt n
        times and joins our rows to its own by position)."""
        tree = self.tree_params()
        if tree is None:
            return rollout_n
        if tree.num_leaves != rollout_n:
            raise ValueError(f"rollout.n={rollout_n} but engine_kwargs.ettrl asks for trees x (1 + forks x branches) "
                             f"= {self.trees} x (1 + {self.forks} x {self.branches}) = {tree.num_leaves} leaves a "
                             f"prompt: make them equal")
        return rollout_n

    def group_seed(self, step: int, group: int) -> int | None:
        return None if self.seed is None else self.seed + step * STEP_SEED_STRIDE + group

    @classmethod
    def from_rollout_config(cls, rollout_config: RolloutConfig | Mapping[str, Any]) -> EttrlRolloutOptions:
        """From a verl RolloutConfig or its DictConfig."""
        engine_kwargs = _get(rollout_config, "engine_kwargs") or {}
        raw = dict(_get(engine_kwargs, "ettrl") or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown} under actor_rollout_ref.rollout.engine_kwargs.ettrl; "
                             f"known: {sorted(known)}")
        if "engine" in raw:
            raw["engine"] = dict(raw["engine"] or {})
        return cls(**raw)


def _get(obj: object, key: str) -> Any:
    return obj.get(key) if hasattr(obj, "get") else getattr(obj, key, None)
