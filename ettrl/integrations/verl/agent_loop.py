"""EttrlAgentLoopManager: verl's rollout manager for tree sampling (rollout.agent.agent_loop_manager_class).

verl's trainer repeats each prompt rollout.n times under one `uid` and wants the rollout back row for row. This
manager sends each uid group to the least-loaded replica (verl's global load balancer) as one request: an ETMR
tree set (/v1/sample_tree) when engine_kwargs.ettrl.trees > 0, else n parallel samples sharing one prefill;
validation batches use parallel samples with val_kwargs. Short trees are padded (batch.pad_group). It returns
verl's batch fields (batch.build_fields) with, when the configured reward manager votes over groups (run_group,
as "ettrl_majority"), the rewards (rm_scores); other reward managers run per sample on verl's reward workers as
verl's own agent loop does. Written for verl's RayPPOTrainer (trainer.use_v1=False); the v1 trainer's
TransferQueue path is not supported.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any, cast

import numpy as np
from tensordict import TensorDict
from verl import DataProto
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.ray_utils import auto_await
from verl.workers.config import HFModelConfig, RolloutConfig

from ettrl.integrations.verl.batch import Leaf, build_fields, pad_group
from ettrl.integrations.verl.options import EttrlRolloutOptions
from ettrl.integrations.verl.reward import FINISH_KEY, reward_fields

log = logging.getLogger("ettrl.integrations.verl")
PADDING_KEY = "ettrl_padding"


class EttrlAgentLoopManager:
    def __init__(self, config, llm_client, teacher_client=None, reward_loop_worker_handles=None):
        if teacher_client is not None:
            raise ValueError("EttrlAgentLoopManager does not run on-policy distillation (a teacher client was given)")
        self.config, self.llm_client = config, llm_client
        self.reward_loop_worker_handles = reward_loop_worker_handles
        self.rollout_config = omega_conf_to_dataclass(config.actor_rollout_ref.rollout, RolloutConfig)
        self.model_config = omega_conf_to_dataclass(config.actor_rollout_ref.model, HFModelConfig)
        self.tokenizer = self.model_config.tokenizer
        self.options = EttrlRolloutOptions.from_rollout_config(self.rollout_config)
        self.options.group_size(self.rollout_config.n)  # checks trees x leaves == rollout.n up front
        self.reward_manager = _group_reward_manager(config, self.tokenizer)

    @classmethod
    @auto_await
    async def create(cls, *args: Any, **kwargs: Any) -> EttrlAgentLoopManager:
        return cls(*args, **kwargs)

    @auto_await
    async def generate_sequences(self, prompts: DataProto) -> DataProto:
        start = time.perf_counter()
        validate = bool(prompts.meta_info.get("validate", False))
        step = int(prompts.meta_info.get("global_steps", 0) or 0)
        groups = _groups(prompts)
        prompt_ids = [self._prompt_ids(prompts, rows[0]) for rows in groups.values()]
        servers = [await self.llm_client._acquire_server(str(uid)) for uid in groups]
        try:
            results = await asyncio.gather(*[
                self._sample(handle, ids, len(rows), validate, self.options.group_seed(step, g))
                for g, ((_, handle), ids, rows) in enumerate(zip(servers, prompt_ids, groups.values()))])
        finally:
            for (server_id, _), uid in zip(servers, groups):
                self.llm_client._release_server(server_id, request_id=str(uid))
        row_prompts: list[list[int] | None] = [None] * len(prompts)
        row_leaves: list[Leaf | None] = [None] * len(prompts)
        row_steps: list[int | None] = [None] * len(prompts)
        for ids, rows, result in zip(prompt_ids, groups.values(), results):
            if result.get("aborted"):
                raise RuntimeError("a rollout request was aborted (a weight sync ran during generation)")
            for i, leaf in zip(rows, pad_group([Leaf.from_json(x) for x in result["leaves"]], len(rows))):
                row_prompts[i], row_leaves[i], row_steps[i] = ids, leaf, result.get("global_steps")
        leaves = cast("list[Leaf]", row_leaves)  # every row is in one uid group: each slot is filled
        fields = build_fields(cast("list[list[int]]", row_prompts), leaves, self.rollout_config.prompt_length,
                              self.rollout_config.response_length, self._pad_id())
        output = DataProto(batch=TensorDict(fields, batch_size=len(prompts)),
                           non_tensor_batch=self._non_tensor(prompts, leaves, row_steps))
        output.meta_info = {"timing": self._timing(results, time.perf_counter() - start)}
        await self._rewards(output)
        return output

    async def _sample(self, handle, prompt_ids: list[int], n: int, validate: bool, seed: int | None) -> dict:
        cfg = self.rollout_config
        source = cfg.val_kwargs if validate else cfg
        params = {"temperature": source.temperature, "top_p": source.top_p, "top_k": source.top_k}
        if validate and not cfg.val_kwargs.do_sample:
            params = {"temperature": 0.0}
        params["max_tokens"] = min(cfg.response_length, cfg.prompt_length + cfg.response_length - len(prompt_ids))
        if seed is not None:
            params["seed"] = seed
        tree = self.options.tree_params()
        if tree is None or validate:
            return await handle.generate_group.remote(prompt_ids, params, n)
        return await handle.sample_tree.remote(prompt_ids, params, {
            "trees": tree.trees, "forks": tree.forks, "branches": tree.branches, "metric": tree.metric,
            "distinct": tree.distinct})

    def _prompt_ids(self, prompts: DataProto, row: int) -> list[int]:
        """The dataset's raw_prompt_ids when present, else the chat template on raw_prompt (left-truncated to
        rollout.prompt_length, as verl's agent loop does)."""
        nt = prompts.non_tensor_batch
        if "raw_prompt_ids" in nt:
            ids = [int(t) for t in nt["raw_prompt_ids"][row]]
        elif "raw_prompt" in nt:
            kwargs = dict(self.config.get("data", {}).get("apply_chat_template_kwargs", None) or {})
            text = self.tokenizer.apply_chat_template(list(nt["raw_prompt"][row]), add_generation_prompt=True,
                                                      tokenize=False, **kwargs)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            raise ValueError("EttrlAgentLoopManager needs each row's prompt: non_tensor_batch['raw_prompt'] (chat "
                             "messages, verl's RL dataset) or ['raw_prompt_ids']")
        limit = self.rollout_config.prompt_length
        if len(ids) > limit:
            log.warning("a prompt of %d tokens exceeds rollout.prompt_length=%d; left-truncating", len(ids), limit)
            ids = ids[-limit:]
        return ids

    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    @staticmethod
    def _non_tensor(prompts: DataProto, leaves: list[Leaf], steps: list) -> dict:
        rows = len(leaves)
        out = dict(prompts.non_tensor_batch)
        out.update({
            "__num_turns__": np.full(rows, 2, dtype=np.int32),
            FINISH_KEY: np.array([leaf.finish_reason for leaf in leaves], dtype=object),
            PADDING_KEY: np.array([leaf.padding for leaf in leaves], dtype=bool),
            "multi_modal_inputs": np.array([{} for _ in range(rows)], dtype=object),
            "min_global_steps": np.array(steps, dtype=object),
            "max_global_steps": np.array(steps, dtype=object),
        })
        return out

    @staticmethod
    def _timing(results: list[dict], seconds: float) -> dict:
        stats = [r["stats"] for r in results if "stats" in r]
        timing = {"agent_loop/generate_sequences/max": seconds, "agent_loop/generate_sequences/mean": seconds}
        if stats:
            decoded = sum(s["decoded_tokens"] for s in stats)
            timing["ettrl/tree_token_ratio"] = decoded / max(1, sum(s["parallel_equivalent_tokens"] for s in stats))
            timing["ettrl/tree_leaves/mean"] = sum(s["leaves"] for s in stats) / len(stats)
        return timing

    async def _rewards(self, output: DataProto):
        """rm_scores for the whole batch from a group reward manager, or per sample from verl's reward workers."""
        if self.reward_manager is not None:
            results = self.reward_manager.run_group(output)
        elif self.reward_loop_worker_handles:
            workers = self.reward_loop_worker_handles
            results = await asyncio.gather(*[workers[i % len(workers)].compute_score.remote(output[i:i + 1])
                                             for i in range(len(output))])
        else:
            return
        tensors, extra, keys = reward_fields(output, results, type(self.reward_manager) if self.reward_manager
                                             else _base_reward_manager())
        output.batch.update(tensors)
        output.non_tensor_batch.update(extra)
        output.meta_info["reward_extra_keys"] = keys


def _groups(prompts: DataProto) -> OrderedDict:
    """uid -> the rows holding that prompt, in order of first appearance."""
    if "uid" not in prompts.non_tensor_batch:
        raise ValueError("EttrlAgentLoopManager groups rows by non_tensor_batch['uid'] (verl's trainer sets it)")
    groups: OrderedDict = OrderedDict()
    for i, uid in enumerate(prompts.non_tensor_batch["uid"]):
        groups.setdefault(uid, []).append(i)
    return groups


def _group_reward_manager(config, tokenizer):
    """The configured reward manager when it votes over groups (has run_group), else None."""
    reward = config.get("reward", None)
    if reward is None or reward.get("reward_manager", None) is None:
        return None
    from verl.trainer.ppo.reward import load_reward_manager, resolve_reward_manager_cls

    if not hasattr(resolve_reward_manager_cls(config), "run_group"):
        return None
    return load_reward_manager(config, tokenizer)


def _base_reward_manager():
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
    return RewardManagerBase

