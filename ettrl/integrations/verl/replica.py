"""EttrlReplica: verl's RolloutReplica for rollout.name=ettrl, so verl places and balances our engines as vLLM's.

A replica is one rollout worker process (tp = dp = pp = 1) whose EttrlServerAdapter owns the engine; launching it
serves the engine's HTTP routes from that worker on its node's address and starts an EttrlHttpServer actor on
the same node, the handle verl's load balancer sends requests to. Hybrid (rollout in the trainer's GPU worker),
colocated (its own worker in a shared placement group; CPU works) and standalone (a GPU pool of its own) modes
come from verl's RolloutReplica.
"""
from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from verl.workers.rollout.replica import RolloutReplica

from ettrl.integrations.verl.server import make_server_actor


class EttrlReplica(RolloutReplica):
    def __init__(self, replica_rank: int, config, model_config, gpus_per_node: int = 8, is_reward_model: bool = False,
                 is_teacher_model: bool = False, name_suffix: str = ""):
        super().__init__(replica_rank, config, model_config, gpus_per_node, is_reward_model, is_teacher_model,
                         name_suffix)
        if self.world_size != 1:
            raise ValueError(f"rollout.name=ettrl runs one engine process per replica: set actor_rollout_ref.rollout."
                             f"tensor_model_parallel_size (and data_ / pipeline_model_parallel_size) to 1, got "
                             f"tp x dp x pp = {self.world_size}")

    def rollout_worker_use_gpu(self) -> bool:
        """The engine runs in the worker, so the worker takes the device its pool has (none on a CPU pool)."""
        return bool(self.resource_pool is not None and self.resource_pool.use_gpu)

    async def launch_servers(self) -> None:
        if len(self.workers) != 1:
            raise RuntimeError(f"an ettrl replica has one rollout worker, got {len(self.workers)}")
        worker = self.workers[0]
        node_id, host, port = await worker.__ray_call__.remote(_serve_from_worker)
        actor = make_server_actor(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            max_concurrency=self.max_concurrency, num_cpus=0)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        server = actor.remote(config=self.config, rollout_mode=self.rollout_mode, worker=worker,
                              replica_rank=self.replica_rank, address=address)
        await server.health.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = address


def _serve_from_worker(worker) -> tuple[str, str, int]:
    """In the rollout worker: serve the adapter's routes on this node's address."""
    from ettrl.integrations.verl.adapter import call_adapter

    host, port = call_adapter(worker, "serve")
    return ray.get_runtime_context().get_node_id(), host, port
