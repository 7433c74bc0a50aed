"""Two ettrl rollout replicas as Ray CPU actors, placed by verl (colocated mode on a CPU resource pool), trained
against by a stand-in trainer in this process: the plug-in resolves in a fresh Ray worker; one GRPO step's weights
reach both replicas through GlooCheckpointEngine (checksums, weight versions); generate and sample_tree give the
tokens of a single-process engine.LLM holding the same weights, also after sleep / wake_up; EttrlAgentLoopManager
spreads prompt groups over both replicas and returns verl's batch fields.

Ray and gloo stay on loopback: tests/conftest.py sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (127.0.0.1 as the node
address, on Linux too), GLOO_SOCKET_IFNAME=lo and RAY_AUTH_MODE=disabled before any test module imports Ray, which
reads them on import. Needs the pinned verl (pip install -e '.[test,verl]'); not collected elsewhere."""
import asyncio
import hashlib
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_tiny_policy  # noqa: E402

pytestmark = pytest.mark.verl

import ray  # noqa: E402
from verl import DataProto  # noqa: E402

from engine import LLM, SamplingParams, TreeParams  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the functions below run in Ray workers
ENGINE = {"kv_cache_memory_gb": 0.02}
TREE = {"trees": 2, "forks": 1, "branches": 2}  # 2 x (1 + 1 x 2) = 6 leaves a prompt
N = 6
PROMPT_LEN, RESPONSE_LEN = 16, 12


def rollout_dict(**overrides) -> dict:
    d = {"name": "ettrl", "tensor_model_parallel_size": 1, "n": N, "prompt_length": PROMPT_LEN,
         "response_length": RESPONSE_LEN, "dtype": "float32", "max_num_seqs": 32, "temperature": 1.0,
         "engine_kwargs": {"ettrl": {**TREE, "seed": 11, "engine": ENGINE}},
         "checkpoint_engine": {"backend": "gloo", "update_weights_bucket_megabytes": 1}}
    d.update(overrides)
    return d


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def _digests(worker):
    from ettrl.integrations.verl.adapter import call_adapter
    return call_adapter(worker, "weight_digests")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Ray on loopback with two replicas; afterwards ray.shutdown() and no worker process left."""
    model_dir = make_tiny_policy(tmp_path_factory.mktemp("verl") / "model")
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    pids: list[int] = []
    try:
        yield _start_replicas(model_dir, pids)
    finally:
        ray.shutdown()
        deadline = time.time() + 60
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.5)
        assert len(pids) >= 4 and not [p for p in pids if _alive(p)], "an actor outlived ray.shutdown()"


class Cluster:
    def __init__(self, model_dir, replicas, config, pids: list[int]):
        self.model_dir, self.replicas, self.config, self.pids = model_dir, replicas, config, pids
        self.trainer_weights: dict[str, torch.Tensor] | None = None


def _start_replicas(model_dir: Path, pids: list[int]) -> Cluster:
    from verl.single_controller.ray.base import RayResourcePool, split_resource_pool
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import HFModelConfig, RolloutConfig
    from verl.workers.rollout.replica import get_rollout_replica_class

    assert not _plugin_check_in_fresh_worker()["preloaded"]
    config = OmegaConf.create({"actor_rollout_ref": {"rollout": rollout_dict(), "model": {"path": str(model_dir)}},
                               "reward": {"reward_manager": {"source": "register", "name": "ettrl_majority"}},
                               "data": {}})
    rollout = omega_conf_to_dataclass(config.actor_rollout_ref.rollout, RolloutConfig)
    model = HFModelConfig(path=str(model_dir))
    pool = RayResourcePool(process_on_nodes=[2], use_gpu=False, max_colocate_count=1)
    replica_cls = get_rollout_replica_class("ettrl")
    replicas = [replica_cls(replica_rank=i, config=rollout, model_config=model, gpus_per_node=1) for i in range(2)]

    async def launch():
        await asyncio.gather(*[r.init_colocated(p) for r, p in zip(replicas, split_resource_pool(pool, 1))])
    asyncio.run(launch())
    actors = [r.workers[0] for r in replicas] + [r.server_handle for r in replicas]
    pids.extend(ray.get([a.__ray_call__.remote(lambda _: os.getpid()) for a in actors]))
    return Cluster(model_dir, replicas, config, pids)


@ray.remote(num_cpus=0)
def _plugin_check(names):
    import sys as worker_sys
    preloaded = "ettrl.integrations.verl.plugin" in worker_sys.modules or "verl" in worker_sys.modules
    import verl  # noqa: F401 - the entry point registers ettrl's pieces
    from verl.checkpoint_engine import CheckpointEngineRegistry
    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import get_rollout_replica_class
    return {"preloaded": preloaded, "pid": os.getpid(),
            "found": [get_rollout_class("ettrl").__name__, get_rollout_replica_class("ettrl").__name__,
                      CheckpointEngineRegistry.get("gloo").__name__, get_reward_manager_cls("ettrl_majority").__name__,
                      get_adv_estimator_fn("ettrl_res").__name__, get_adv_estimator_fn("ettrl_clip").__name__]}


def _plugin_check_in_fresh_worker() -> dict:
    # a runtime env of its own gets a worker process of its own
    fresh = {"env_vars": {"ETTRL_TEST_FRESH_WORKER": uuid.uuid4().hex}}
    return ray.get(_plugin_check.options(runtime_env=fresh).remote(None), timeout=300)


def test_the_plugin_resolves_in_a_fresh_ray_worker(cluster):
    result = _plugin_check_in_fresh_worker()
    assert not result["preloaded"] and result["pid"] != os.getpid()
    assert result["found"] == ["EttrlServerAdapter", "EttrlReplica", "GlooCheckpointEngine",
                               "EttrlMajorityRewardManager", "ettrl_res", "ettrl_clip"]


def test_both_replicas_serve_on_loopback(cluster):
    assert [r.server_address.split(":")[0] for r in cluster.replicas] == ["127.0.0.1", "127.0.0.1"]
    assert [ray.get(r.server_handle.health.remote()) for r in cluster.replicas] == [{"status": "ok"}] * 2


# ---- the stand-in trainer: one GRPO step, then the weights go out over gloo ---------------------------------------
def grpo_step(cluster: Cluster) -> dict[str, torch.Tensor]:
    """Samples a group from replica 0, rewards responses by their share of bytes below 128 (any reward with spread
    will do), and takes one GRPO step with ettrl's own update."""
    from ettrl.advantages import grpo_advantages
    from ettrl.backends.torch_backend import TorchBackend
    from ettrl.config import TrainerConfig
    from ettrl.policy import load_policy
    from ettrl.samples import TrainSample
    from ettrl.update import policy_update

    prompt = [72, 105, 33, 32]
    result = ray.get(cluster.replicas[0].server_handle.generate_group.remote(prompt, {"temperature": 1.0,
                                                                                      "seed": 1}, 6))
    responses = [leaf["token_ids"] for leaf in result["leaves"]]
    rewards = [sum(t < 128 for t in r) / len(r) for r in responses]
    advantages = grpo_advantages(rewards)
    assert advantages.abs().max() > 0
    model, _ = load_policy(cluster.model_dir)
    tcfg = TrainerConfig(lr=1e-2, micro_batch_size=6, warmup_ratio=0.0)
    samples = [TrainSample(prompt, r, [float(a)] * len(r)) for r, a in zip(responses, advantages)]
    policy_update(TorchBackend(model, tcfg, total_steps=1), samples, tcfg, 1.0, 257)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def sync_weights(cluster: Cluster, weights: dict[str, torch.Tensor], global_steps: int):
    """verl's CheckpointEngineManager.update_weights, step by step, with this process as the trainer's rank 0."""
    from verl.checkpoint_engine import CheckpointEngineRegistry
    from verl.checkpoint_engine.base import CheckpointEngineWorker
    from verl.single_controller.ray import RayClassWithInitArgs, RayWorkerGroup

    replicas = cluster.replicas

    async def each(method: str):
        await asyncio.gather(*[getattr(r, method)() for r in replicas])

    asyncio.run(each("abort_all_requests"))
    asyncio.run(each("release_kv_cache"))
    workers = [w for r in replicas for w in r.workers]
    group = RayWorkerGroup(worker_handles=workers, ray_cls_with_init=RayClassWithInitArgs(
        cls=ray.remote(CheckpointEngineWorker)))
    trainer = CheckpointEngineRegistry.new("gloo", bucket_size=1 << 20, is_master=True)
    metadata = [trainer.prepare()] + ray.get(group.execute_checkpoint_engine(["prepare"] * len(workers)))
    actor_kwargs, rollout_kwargs = type(trainer).build_topology(1, len(workers), metadata)
    joining = group.execute_checkpoint_engine(method=["init_process_group"] * len(workers), **rollout_kwargs)
    trainer.init_process_group(**{k: v[0] for k, v in actor_kwargs.items()})
    ray.get(joining)
    receiving = group.update_weights(global_steps=global_steps)
    asyncio.run(trainer.send_weights(iter(weights.items()), global_steps=global_steps))
    ray.get(receiving)
    trainer.finalize()
    ray.get(group.execute_checkpoint_engine(["finalize"] * len(workers)))
    asyncio.run(each("resume_kv_cache"))
    asyncio.run(each("resume_generation"))


@pytest.fixture(scope="module")
def synced(cluster):
    versions_before = [ray.get(r.server_handle.weight_version.remote()) for r in cluster.replicas]
    weights = grpo_step(cluster)
    initial = LLM(cluster.model_dir, dtype="float32", **ENGINE).engine.runner.model.hf_parameter_views()
    assert any(sha(weights[n]) != sha(initial[n]) for n in weights), "the GRPO step must move the weights"
    sync_weights(cluster, weights, global_steps=1)
    cluster.trainer_weights = weights
    return cluster, versions_before


def test_one_grpo_step_reaches_every_replica_over_gloo(synced):
    cluster, before = synced
    expected = {name: sha(t) for name, t in cluster.trainer_weights.items()}
    for replica in cluster.replicas:
        digests = ray.get(replica.workers[0].__ray_call__.remote(_digests))
        assert {name: digests[name] for name in expected} == expected
    after = [ray.get(r.server_handle.weight_version.remote()) for r in cluster.replicas]
    assert before == ["0", "0"] and after == ["1", "1"]


def reference_llm(cluster: Cluster) -> LLM:
    llm = LLM(cluster.model_dir, dtype="float32", **ENGINE)
    llm.update_weights(cluster.trainer_weights)
    return llm


PROMPTS = [[72, 105, 33, 32], [50, 43, 50, 61]]


def assert_engines_match_reference(cluster: Cluster, llm: LLM):
    for r, replica in enumerate(cluster.replicas):
        server = replica.server_handle
        for i, prompt in enumerate(PROMPTS):
            seed = 100 * r + i
            got = ray.get(server.generate.remote(prompt, {"temperature": 1.0, "top_p": 0.9, "seed": seed,
                                                          "logprobs": True}, f"req-{r}-{i}"))
            want = llm.generate([prompt], SamplingParams(temperature=1.0, top_p=0.9, seed=seed,
                                                         max_tokens=RESPONSE_LEN))[0].outputs[0]
            assert got.token_ids == want.token_ids and got.stop_reason == "completed"
            assert got.log_probs == pytest.approx(want.logprobs, abs=1e-5)
            tree = ray.get(server.sample_tree.remote(prompt, {"temperature": 1.0, "seed": seed}, TREE))
            want_tree = llm.sample_tree([prompt], TreeParams(**TREE),
                                        SamplingParams(temperature=1.0, seed=seed, max_tokens=RESPONSE_LEN))[0]
            assert [leaf["token_ids"] for leaf in tree["leaves"]] == [leaf.token_ids for leaf in want_tree.leaves]
            assert [tuple(leaf["origin"].values()) for leaf in tree["leaves"]] == [leaf.origin
                                                                                  for leaf in want_tree.leaves]


def test_generate_and_sample_tree_match_a_single_process_llm(synced):
    cluster, _ = synced
    assert_engines_match_reference(cluster, reference_llm(cluster))


def test_the_same_after_sleep_and_wake_up(synced):
    cluster, _ = synced

    async def cycle():
        await asyncio.gather(*[r.sleep() for r in cluster.replicas])
        await asyncio.gather(*[r.wake_up() for r in cluster.replicas])
    asyncio.run(cycle())
    assert_engines_match_reference(cluster, reference_llm(cluster))


# ---- EttrlAgentLoopManager -----------------------------------------------------------------------------------------
def manager_for(cluster: Cluster, **rollout_overrides):
    from verl.workers.rollout.llm_server import LLMServerClient
    from verl.workers.rollout.router import get_router_handle

    from ettrl.integrations.verl import EttrlAgentLoopManager

    config = OmegaConf.merge(cluster.config, {"actor_rollout_ref": {"rollout": rollout_overrides}})
    balancer = get_router_handle(servers={r.server_address: r.server_handle for r in cluster.replicas})
    cluster.pids.append(ray.get(balancer.__ray_call__.remote(lambda _: os.getpid())))
    return EttrlAgentLoopManager.create(config=config, llm_client=LLMServerClient(config, balancer)), config


def prompt_batch(prompts: list[list[int]], n: int, step: int) -> DataProto:
    rows = [p for p in prompts for _ in range(n)]
    uids = [f"uid-{i}" for i, _ in enumerate(prompts) for _ in range(n)]
    data = DataProto.from_dict(non_tensors={"uid": np.array(uids, dtype=object),
                                            "raw_prompt_ids": np.array(rows + [None], dtype=object)[:-1],
                                            "data_source": np.array(["tiny"] * len(rows), dtype=object)})
    data.meta_info = {"global_steps": step}
    return data


def test_the_manager_spreads_prompt_groups_over_both_replicas(synced):
    from ettrl.integrations.verl.options import EttrlRolloutOptions

    cluster, _ = synced
    manager, config = manager_for(cluster)
    counts = [ray.get(r.server_handle.request_counts.remote())["sample_tree"] for r in cluster.replicas]
    out = manager.generate_sequences(prompt_batch(PROMPTS, N, step=3))
    after = [ray.get(r.server_handle.request_counts.remote())["sample_tree"] for r in cluster.replicas]
    assert [a - b for a, b in zip(after, counts)] == [1, 1], "one tree set a group, one group a replica"

    assert out.batch["responses"].shape == (2 * N, RESPONSE_LEN) and out.batch["prompts"].shape == (2 * N, PROMPT_LEN)
    for key in ("response_mask", "input_ids", "attention_mask", "position_ids", "rollout_log_probs", "rm_scores"):
        assert key in out.batch.keys(), key
    assert list(out.non_tensor_batch["uid"]) == [f"uid-{i}" for i in range(2) for _ in range(N)]
    assert "majority_ratio" in out.meta_info["reward_extra_keys"] and "timing" in out.meta_info
    options = EttrlRolloutOptions.from_rollout_config(config.actor_rollout_ref.rollout)
    llm = reference_llm(cluster)
    for g, prompt in enumerate(PROMPTS):
        want = llm.sample_tree([prompt], options.tree_params(), SamplingParams(
            temperature=1.0, seed=options.group_seed(3, g), max_tokens=RESPONSE_LEN))[0].leaves
        rows = range(g * N, (g + 1) * N)
        assert len(want) == N
        for row, leaf in zip(rows, want):
            n = len(leaf.token_ids)
            assert out.batch["responses"][row, :n].tolist() == leaf.token_ids
            assert out.batch["prompts"][row, -len(prompt):].tolist() == prompt
            assert out.batch["response_mask"][row].sum() == n
            assert out.batch["rollout_log_probs"][row, :n].tolist() == pytest.approx(leaf.logprobs, abs=1e-5)


def test_the_manager_pads_trees_that_cannot_fork_and_ettrl_res_skips_the_fillers(synced):
    """One-token responses have no fork position: 2 roots a prompt where 6 rows are asked, padded with 4 fillers;
    verl's compute_advantage with ettrl_res then takes the entropies from the manager's own batch."""
    from verl.trainer.ppo.ray_trainer import compute_advantage

    from ettrl.advantages import AdvantageConfig, compute_advantages

    cluster, _ = synced
    manager, _ = manager_for(cluster, response_length=1)
    out = manager.generate_sequences(prompt_batch(PROMPTS, N, step=4))
    padding = out.non_tensor_batch["ettrl_padding"].tolist()
    assert padding == ([False] * 2 + [True] * 4) * 2
    assert out.batch["response_mask"].sum(-1).tolist() == ([1] * 2 + [0] * 4) * 2
    assert torch.equal(out.batch["responses"][2:6], out.batch["responses"][1:2].expand(4, -1))  # copies of the last

    rewards = torch.tensor([1.0, 0.0, 9.0, 9.0, 9.0, 9.0, 0.5, 2.0, 9.0, 9.0, 9.0, 9.0])
    out.batch["token_level_rewards"] = rewards.unsqueeze(-1) * out.batch["response_mask"].float()
    got = compute_advantage(out, adv_estimator="ettrl_res", config=OmegaConf.create({}))
    real = [0, 1, 6, 7]
    entropies = out.batch["rollout_entropies"][real, 0]
    want = compute_advantages(rewards[real], AdvantageConfig(shaping="res", std="bessel"),
                              groups=["a", "a", "b", "b"], response_entropies=entropies)
    assert got.batch["advantages"][real, 0].tolist() == pytest.approx(want.tolist(), abs=1e-6)
    assert got.batch["advantages"][[2, 3, 4, 5, 8, 9, 10, 11]].abs().sum() == 0
