"""ettrl.integrations.verl without Ray: the plug-in's registrations, the advantage estimators and the reward manager
through verl's own calls with hand-computed values, the batch layout, the options, the gloo checkpoint engine.

Needs the pinned verl (pip install -e '.[test,verl]'); not collected elsewhere (tests/conftest.py)."""
import asyncio
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import policy_byte_tokenizer  # noqa: E402

pytestmark = pytest.mark.verl

import verl  # noqa: E402
from verl import DataProto  # noqa: E402

from ettrl.integrations.verl import plugin  # noqa: E402
from ettrl.integrations.verl.batch import Leaf, build_fields, pad_group  # noqa: E402
from ettrl.integrations.verl.options import EttrlRolloutOptions  # noqa: E402

EPS = 1e-6


# ---- the plug-in ----------------------------------------------------------------------------------------------------
def test_import_verl_registers_every_piece():
    from verl.checkpoint_engine import CheckpointEngineRegistry
    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
    from verl.experimental.reward_loop.reward_manager.registry import REWARD_MANAGER
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import get_rollout_replica_class

    from ettrl.integrations.verl import (
        EttrlMajorityRewardManager,
        EttrlReplica,
        EttrlServerAdapter,
        GlooCheckpointEngine,
    )
    from ettrl.integrations.verl.advantage import ettrl_clip, ettrl_res

    assert get_rollout_class("ettrl", "async") is EttrlServerAdapter
    assert get_rollout_replica_class("ettrl") is EttrlReplica
    assert CheckpointEngineRegistry.get("gloo") is GlooCheckpointEngine
    assert get_reward_manager_cls("ettrl_majority") is EttrlMajorityRewardManager
    assert get_adv_estimator_fn("ettrl_res") is ettrl_res and get_adv_estimator_fn("ettrl_clip") is ettrl_clip
    assert "ettrl_majority" in REWARD_MANAGER  # what verl's RewardManagerConfig checks a name against
    plugin.register()  # idempotent


def test_another_verl_version_is_refused_naming_both():
    assert verl.__version__ == plugin.PINNED_VERL
    with pytest.raises(ImportError, match=r"verl 0\.9\.1.*verl 0\.10\.0 is installed"):
        plugin.check_verl_version("0.10.0")


def test_a_gloo_engine_of_verls_own_is_not_replaced():
    from verl.checkpoint_engine import CheckpointEngineRegistry

    ours = CheckpointEngineRegistry._registry["gloo"]

    class VerlsGloo:
        pass

    CheckpointEngineRegistry._registry["gloo"] = VerlsGloo
    try:
        with pytest.raises(RuntimeError, match="already registers a checkpoint engine named 'gloo'.*VerlsGloo"):
            plugin._register_checkpoint_engine()
        assert CheckpointEngineRegistry._registry["gloo"] is VerlsGloo
    finally:
        CheckpointEngineRegistry._registry["gloo"] = ours


# ---- options --------------------------------------------------------------------------------------------------------
def rollout_config(**kwargs):
    from verl.workers.config import RolloutConfig
    return RolloutConfig(name="ettrl", tensor_model_parallel_size=1, **kwargs)


def test_tree_options_come_from_engine_kwargs_and_must_match_rollout_n():
    cfg = rollout_config(n=12, engine_kwargs={"ettrl": {"trees": 4, "forks": 1, "branches": 2, "seed": 5}})
    options = EttrlRolloutOptions.from_rollout_config(cfg)
    assert options.tree_params().num_leaves == 12 and options.group_size(12) == 12
    assert options.group_seed(step=2, group=3) == 5 + 2 * 2**20 + 3
    with pytest.raises(ValueError, match=r"rollout.n=8 .* = 12 leaves"):
        options.group_size(8)
    assert EttrlRolloutOptions.from_rollout_config(rollout_config(n=5)).group_size(5) == 5  # parallel sampling
    with pytest.raises(ValueError, match=r"unknown keys \['tree'\]"):
        EttrlRolloutOptions.from_rollout_config(rollout_config(engine_kwargs={"ettrl": {"tree": 4}}))
    with pytest.raises(ValueError, match="metric"):
        EttrlRolloutOptions(trees=2, metric="variance")


# ---- the batch layout -----------------------------------------------------------------------------------------------
def test_batch_fields_lay_out_rows_as_verls_agent_loop_and_fillers_weigh_nothing():
    leaf = Leaf([7, 8], [-0.5, -0.25], [1.0, 2.0], "stop")
    rows = pad_group([leaf], 2)
    assert [r.padding for r in rows] == [False, True] and rows[1].token_ids == [7, 8]
    f = build_fields([[5, 6], [5, 6]], rows, prompt_length=4, response_length=3, pad_id=9)
    assert f["prompts"].tolist() == [[9, 9, 5, 6]] * 2
    assert f["responses"].tolist() == [[7, 8, 9]] * 2
    assert f["input_ids"].tolist() == [[9, 9, 5, 6, 7, 8, 9]] * 2
    assert f["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 0]] * 2
    assert f["position_ids"].tolist() == [[0, 0, 0, 1, 2, 3, 3]] * 2
    assert f["response_mask"].tolist() == [[1, 1, 0], [0, 0, 0]]  # the filler's tokens count nowhere
    assert f["rollout_log_probs"].tolist() == [[-0.5, -0.25, 0.0]] * 2
    assert f["rollout_entropies"].tolist() == [[1.0, 2.0, 0.0]] * 2
    with pytest.raises(ValueError, match="rollout.prompt_length=4"):
        build_fields([[1] * 5], [leaf], prompt_length=4, response_length=3, pad_id=0)
    with pytest.raises(ValueError, match="3 responses for a group of 2"):
        pad_group([leaf] * 3, 2)


# ---- advantage estimators through verl's compute_advantage --------------------------------------------------------
def advantage_batch(rewards: list[float], lengths: list[int], uids: list[str], token_entropy: list[float]):
    width = max(lengths)
    mask = torch.zeros(len(rewards), width, dtype=torch.long)
    scores = torch.zeros(len(rewards), width)
    entropies = torch.zeros(len(rewards), width)
    for i, (r, n, h) in enumerate(zip(rewards, lengths, token_entropy)):
        mask[i, :n] = 1
        if n:
            scores[i, n - 1] = r
        entropies[i, :max(n, 1)] = h
    return DataProto.from_dict(tensors={"token_level_rewards": scores, "response_mask": mask,
                                        "rollout_entropies": entropies},
                               non_tensors={"uid": np.array(uids, dtype=object)})


def verl_advantages(data: DataProto, estimator: str, **ettrl_params) -> torch.Tensor:
    from verl.trainer.ppo.ray_trainer import compute_advantage

    config = OmegaConf.create({"norm_adv_by_std_in_grpo": True, "ettrl": ettrl_params})
    out = compute_advantage(data, adv_estimator=estimator, config=config)
    return out.batch["advantages"]


# group a: rewards 3, 1 -> mean 2, std (n - 1) sqrt(2), A = +-1/sqrt(2); group b: 0, 0, 3 (+ a filler with reward 7
# that must count nowhere) -> mean 1, std sqrt(3), A = -1/sqrt(3), -1/sqrt(3), 2/sqrt(3); group c: one row, reward 4
# -> verl's rule for a group of one: mean 0, std 1, A = 4.
REWARDS = [3.0, 1.0, 0.0, 0.0, 3.0, 7.0, 4.0]
LENGTHS = [2, 3, 1, 2, 4, 0, 2]
UIDS = ["a", "a", "b", "b", "b", "b", "c"]
GRPO = [1 / (2**0.5 + EPS), -1 / (2**0.5 + EPS), -1 / (3**0.5 + EPS), -1 / (3**0.5 + EPS), 2 / (3**0.5 + EPS), 0.0,
        4 / (1 + EPS)]


def per_row(advantages: torch.Tensor, lengths: list[int]) -> list[float]:
    """The row's advantage, checked to be the same on every response token and 0 after them."""
    out = []
    for row, n in zip(advantages, lengths):
        assert torch.all(row[n:] == 0)
        assert torch.allclose(row[:n], row[:1].expand(n)) if n else True
        out.append(float(row[0]) if n else 0.0)
    return out


def test_ettrl_clip_through_verls_compute_advantage():
    data = advantage_batch(REWARDS, LENGTHS, UIDS, [1.0] * 7)
    got = per_row(verl_advantages(data, "ettrl_clip", clip_beta=1.0), LENGTHS)
    expected = [min(max(a, -1.0), 1.0) for a in GRPO]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert expected[4] == 1.0 and expected[6] == 1.0 and abs(expected[0]) < 1  # both clipped and unclipped rows


def test_ettrl_res_through_verls_compute_advantage_reads_the_rollout_entropies():
    # group a: H = 1 and 3, Hbar = 2 -> Y = 1 + (2 - 1)/2 = 1.5 -> clipped to 1.2; Y = 0.5 -> 0.8 (alpha = beta = 0.2);
    # group b: equal entropies -> Y = 1; the filler's entropy (50) must not move b's mean; group c: Y = 1.
    data = advantage_batch(REWARDS, LENGTHS, UIDS, [1.0, 3.0, 2.0, 2.0, 2.0, 50.0, 5.0])
    got = per_row(verl_advantages(data, "ettrl_res"), LENGTHS)
    expected = [GRPO[0] * 1.2, GRPO[1] * 0.8, *GRPO[2:]]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
    got = per_row(verl_advantages(data, "ettrl_res", res_beta=0.6), LENGTHS)  # Y = 1.5 now within [0.8, 1.6]
    assert got[0] == pytest.approx(GRPO[0] * 1.5, rel=1e-5)


def test_estimators_refuse_what_they_cannot_do():
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    data = advantage_batch(REWARDS, LENGTHS, UIDS, [1.0] * 7)
    del data.batch["rollout_entropies"]
    with pytest.raises(ValueError, match="ettrl_res needs each response's token entropies"):
        verl_advantages(data, "ettrl_res")
    with pytest.raises(ValueError, match="Dr. GRPO"):
        get_adv_estimator_fn("ettrl_clip")(data.batch["token_level_rewards"], data.batch["response_mask"],
                                           np.array(UIDS, dtype=object), OmegaConf.create(
                                               {"norm_adv_by_std_in_grpo": False}))
    with pytest.raises(ValueError, match=r"unknown keys \['beta'\] under algorithm.ettrl"):
        verl_advantages(data, "ettrl_clip", beta=1.0)


# ---- the majority-vote reward manager through verl's loader ---------------------------------------------------------
def reward_config(**reward_kwargs):
    return OmegaConf.create({"reward": {"reward_manager": {"source": "register", "name": "ettrl_majority"},
                                        "reward_kwargs": reward_kwargs}})


def reward_batch(texts: list[str], uids: list[str], finish: list[str], real: list[bool], tokenizer):
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    leaves = [Leaf(i, [0.0] * len(i), [0.0] * len(i), f, padding=not r) for i, f, r in zip(ids, finish, real)]
    fields = build_fields([[1, 2]] * len(texts), leaves, prompt_length=2, response_length=max(map(len, ids)),
                          pad_id=tokenizer.pad_token_id)
    return DataProto.from_dict(tensors=fields, non_tensors={"uid": np.array(uids, dtype=object),
                                                            "ettrl_finish_reason": np.array(finish, dtype=object)})


def test_majority_vote_rewards_through_verls_reward_loader():
    from verl.trainer.ppo.reward import load_reward_manager, resolve_reward_manager_cls

    tokenizer = policy_byte_tokenizer()
    # group a: 4, 2+2 (equivalent), 5 -> label 4 (2 of 3), rewards 1 1 0. group b: an unclosed box (no answer),
    # 7 cut at the length limit (does not vote), 9, and a filler copy of 9 -> label 9 (1 of 3 real), 0 0 1, filler 0.
    texts = ["so \\boxed{4}", "\\boxed{2+2}.", "\\boxed{5}", "\\boxed{7", "\\boxed{7}", "\\boxed{9}", "\\boxed{9}"]
    uids = ["a", "a", "a", "b", "b", "b", "b"]
    finish = ["stop", "stop", "stop", "stop", "length", "stop", "stop"]
    real = [True] * 6 + [False]
    data = reward_batch(texts, uids, finish, real, tokenizer)
    config = reward_config()
    cls = resolve_reward_manager_cls(config)
    manager = load_reward_manager(config, tokenizer)
    results = manager.run_group(data)
    assert [r["reward_score"] for r in results] == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert [r["reward_extra_info"]["majority_ratio"] for r in results] == pytest.approx([2 / 3] * 3 + [1 / 3] * 3
                                                                                       + [0.0])
    assert [r["reward_extra_info"]["answered"] for r in results] == [1, 1, 1, 0, 0, 1, 0]
    rm = cls.assemble_rm_scores(data, [r["reward_score"] for r in results])  # verl's layout: on the last token
    last = [len(tokenizer(t, add_special_tokens=False).input_ids) - 1 for t in texts]
    assert [float(rm[i, last[i]]) for i in range(len(texts))] == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert float(rm.sum()) == 3.0
    with pytest.raises(NotImplementedError, match="EttrlAgentLoopManager"):
        asyncio.run(manager.run_single(data[:1]))


def test_majority_vote_last_number_fallback_comes_from_reward_kwargs():
    from verl.trainer.ppo.reward import load_reward_manager

    tokenizer = policy_byte_tokenizer()
    data = reward_batch(["it is 12", "12", "13"], ["a"] * 3, ["stop"] * 3, [True] * 3, tokenizer)
    assert [r["reward_score"] for r in load_reward_manager(reward_config(), tokenizer).run_group(data)] == [0.0] * 3
    manager = load_reward_manager(reward_config(last_number_fallback=True), tokenizer)
    assert [r["reward_score"] for r in manager.run_group(data)] == [1.0, 1.0, 0.0]


# ---- the gloo checkpoint engine, three local ranks ------------------------------------------------------------------
def test_gloo_checkpoint_engine_moves_every_tensor_across_buckets():
    from verl.checkpoint_engine import CheckpointEngineRegistry

    weights = {"a": torch.randn(100), "b": torch.arange(12, dtype=torch.int64).reshape(3, 4),
               "c": torch.randn(7, 5).to(torch.bfloat16), "d": torch.tensor([1.5])}
    bucket = 64  # bytes: "a" (400 bytes) travels in 7 chunks, the others share buckets
    sender = CheckpointEngineRegistry.new("gloo", bucket_size=bucket, is_master=True, timeout_s=60)
    bystander = CheckpointEngineRegistry.new("gloo", bucket_size=bucket, timeout_s=60)   # trainer rank 1
    receiver = CheckpointEngineRegistry.new("gloo", bucket_size=bucket, timeout_s=60)    # a rollout worker
    metadata = [sender.prepare(), bystander.prepare(), receiver.prepare()]
    actor, rollout = type(sender).build_topology(2, 1, metadata)
    assert actor["rank"] == [0, -1] and rollout["rank"] == [1]
    received, walked, errors = {}, [], []

    def run(fn):
        try:
            asyncio.run(fn())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    async def send():
        sender.init_process_group(**{k: v[0] for k, v in actor.items()})
        await sender.send_weights(iter(weights.items()))

    async def sit_out():
        bystander.init_process_group(**{k: v[1] for k, v in actor.items()})

        def generator():
            for item in weights.items():
                walked.append(item[0])
                yield item
        await bystander.send_weights(generator())

    async def receive():
        receiver.init_process_group(**{k: v[0] for k, v in rollout.items()})
        async for name, tensor in receiver.receive_weights():
            received[name] = tensor.clone()

    threads = [threading.Thread(target=run, args=(fn,)) for fn in (send, sit_out, receive)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert walked == list(weights)  # a rank that sits out still produces its weights (collective on the trainer)
    assert list(received) == list(weights)
    for name, w in weights.items():
        assert received[name].dtype == w.dtype and torch.equal(received[name], w), name
    for engine in (sender, bystander, receiver):
        engine.finalize()
    with pytest.raises(ValueError, match="is_master=True"):
        type(sender).build_topology(1, 1, [None, None])


# ---- the documented config ------------------------------------------------------------------------------------------
def documented_overrides() -> list[str]:
    """The overrides of docs/integrations.md's verl command (the block after <!-- verl-overrides -->)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    block = text.split("<!-- verl-overrides -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    words = block.replace("\\\n", " ").split()
    return [w for w in words[words.index("verl.trainer.main_ppo") + 1:] if "=" in w and not w.endswith("=...")]


def test_the_documented_overrides_compose_with_verls_config_and_every_piece_takes_them(tmp_path):
    import os

    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn
    from verl.trainer.ppo.reward import resolve_reward_manager_cls
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.import_utils import load_class_from_fqn

    from ettrl.integrations.verl import EttrlAgentLoopManager, EttrlMajorityRewardManager
    from ettrl.integrations.verl.advantage import advantage_config

    overrides = documented_overrides()
    assert "actor_rollout_ref.rollout.name=ettrl" in overrides and len(overrides) > 10
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)  # verl's RolloutConfig, as its workers do
    options = EttrlRolloutOptions.from_rollout_config(rollout)
    assert (options.trees, options.forks, options.branches) == (4, 2, 2) and options.group_size(rollout.n) == 20
    manager_class = load_class_from_fqn(rollout.agent.agent_loop_manager_class, "AgentLoopManager")
    assert manager_class is EttrlAgentLoopManager
    assert resolve_reward_manager_cls(cfg) is EttrlMajorityRewardManager
    assert get_adv_estimator_fn(cfg.algorithm.adv_estimator).__name__ == "ettrl_res"
    assert advantage_config("res", cfg.algorithm).res_beta == 0.2
    assert not cfg.trainer.use_v1


# ---- the adapter in this process --------------------------------------------------------------------------------
@pytest.fixture
def adapter(tmp_path):
    from verl.workers.config import HFModelConfig

    from ettrl.integrations.verl import EttrlServerAdapter
    from tiny_models import make_tiny_policy

    model = HFModelConfig(path=str(make_tiny_policy(tmp_path / "model")))
    engine = {"kv_cache_memory_gb": 0.02}
    a = EttrlServerAdapter(rollout_config(dtype="float32", engine_kwargs={"ettrl": {"engine": engine}}), model)
    yield a
    a.shutdown()


def test_a_bad_weight_stream_writes_nothing_and_names_the_problem(adapter):
    before = adapter.weight_digests()
    good = torch.zeros_like(adapter.llm.engine.runner.model.hf_parameter_views()["model.norm.weight"])
    with pytest.raises(ValueError, match="unknown parameter name 'model.nope'.*nothing was written"):
        asyncio.run(adapter.update_weights(iter([("model.norm.weight", good), ("model.nope", good)])))
    with pytest.raises(ValueError, match="wire_format='named_tensors'"):
        asyncio.run(adapter.update_weights(iter([]), wire_format="delta_flush"))
    assert adapter.weight_digests() == before and adapter.weight_version() == "0"
    assert asyncio.run(adapter.update_weights(iter([("model.norm.weight", good)]), global_steps=7)) == 1
    assert adapter.weight_version() == "1" and adapter.weight_digests() != before


def test_sleep_and_wake_up_follow_verls_tags_and_requests_wait_meanwhile(adapter):
    loop = adapter.server.loop
    asyncio.run(adapter.release())                      # LLM.sleep(2): no KV pool, requests held
    assert adapter.llm.engine.asleep and loop.paused
    asyncio.run(adapter.resume(["weights"]))            # weights back (on the CPU they never left), still no pool
    assert adapter.llm.engine.asleep and loop.paused
    asyncio.run(adapter.resume(["kv_cache"]))           # whole again: requests flow
    assert not adapter.llm.engine.asleep and not loop.paused
    adapter.abort_all_requests()
    adapter.release_kv_cache()                          # a weight sync: both reasons hold the requests
    adapter.resume_kv_cache()
    assert loop.paused, "still held: generation has not been resumed"
    adapter.resume_generation()
    assert not loop.paused


def test_sampling_parameters_the_engine_cannot_honour_are_refused():
    from ettrl.integrations.verl.server import engine_sampling

    assert engine_sampling({"temperature": 0.7, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.0, "seed": 3}) == {
        "temperature": 0.7, "top_p": 0.9, "top_k": -1, "seed": 3}
    with pytest.raises(ValueError, match="no repetition penalty"):
        engine_sampling({"repetition_penalty": 1.1})
    with pytest.raises(ValueError, match=r"\['min_p'\]"):
        engine_sampling({"min_p": 0.1})
