"""TTRL's majority vote as a verl reward manager ("ettrl_majority", in the agent-loop reward registry).

A vote needs the whole group, and verl 0.9.1's reward loop scores one sample at a time (run_single), so the vote
runs in EttrlAgentLoopManager, which calls run_group on each step's whole batch. Rows are grouped by `uid`; each
response's answer is the last \\boxed{} of its decoded text (ettrl.grading.extract_answer); a response cut at the
length limit does not vote (as our trainer); the label is the majority over equivalence classes
(ettrl.rewards.majority_vote) and the reward is 1 for agreement, else 0. Fillers (response_mask all zero) neither
vote nor earn. Options under `reward.reward_kwargs`: last_number_fallback (default false).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from verl import DataProto
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

REWARD_MANAGER_NAME = "ettrl_majority"
FINISH_KEY = "ettrl_finish_reason"  # per-row non-tensor field EttrlAgentLoopManager returns ("stop" / "length")


class EttrlMajorityRewardManager(RewardManagerBase):
    def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None, reward_model_tokenizer=None,
                 **kwargs):
        super().__init__(config, tokenizer, compute_score)
        reward = config.get("reward", {}) if hasattr(config, "get") else {}
        kwargs = dict(reward.get("reward_kwargs", None) or {}) if hasattr(reward, "get") else {}
        self.last_number_fallback = bool(kwargs.get("last_number_fallback", False))

    async def run_single(self, data: DataProto) -> dict[str, Any]:
        raise NotImplementedError(
            f"the '{REWARD_MANAGER_NAME}' reward manager votes over a prompt's whole group, which verl's per-sample "
            f"reward loop cannot give it: set actor_rollout_ref.rollout.agent.agent_loop_manager_class="
            f"ettrl.integrations.verl.EttrlAgentLoopManager, which calls run_group on each batch")

    def run_group(self, data: DataProto) -> list[dict]:
        """One {"reward_score", "reward_extra_info"} per row, as run_single returns for one."""
        from ettrl.grading import extract_answer
        from ettrl.rewards import majority_vote

        texts, real = self._responses(data)
        finish = data.non_tensor_batch.get(FINISH_KEY)
        answers = [None if not real[i] or (finish is not None and finish[i] == "length")
                   else extract_answer(texts[i], self.last_number_fallback) for i in range(len(data))]
        groups: dict = defaultdict(list)
        for i, uid in enumerate(data.non_tensor_batch["uid"]):
            if real[i]:
                groups[uid].append(i)
        out = [{"reward_score": 0.0, "reward_extra_info": {"majority_ratio": 0.0, "answered": 0.0}}
               for _ in range(len(data))]
        for rows in groups.values():
            vote = majority_vote([answers[i] for i in rows])
            for i, reward in zip(rows, vote.rewards):
                out[i] = {"reward_score": reward, "reward_extra_info": {
                    "majority_ratio": vote.ratio, "answered": float(answers[i] is not None)}}
        return out

    def _responses(self, data: DataProto) -> tuple[list[str], list[bool]]:
        responses = data.batch["responses"]
        width = responses.shape[-1]
        lengths = data.batch["attention_mask"][:, -width:].sum(-1).tolist()
        real = (data.batch["response_mask"].sum(-1) > 0).tolist() if "response_mask" in data.batch.keys() \
            else [True] * len(data)
        texts = [self.tokenizer.decode(responses[i, :n].tolist(), skip_special_tokens=True)
                 for i, n in enumerate(lengths)]
        return texts, real


def reward_fields(data: DataProto, results: list[dict], manager_cls: type[RewardManagerBase]
                  ) -> tuple[dict, dict, list[str]]:
    """rm_scores (verl's layout: the reward on the last response token) and the reward_extra_info columns."""
    rm_scores = manager_cls.assemble_rm_scores(data, [r["reward_score"] for r in results])
    infos = [r.get("reward_extra_info", {}) for r in results]
    keys = list(infos[0]) if infos else []
    return {"rm_scores": rm_scores}, {k: np.array([info[k] for info in infos]) for k in keys}, keys
