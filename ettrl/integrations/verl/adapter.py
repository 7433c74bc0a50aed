"""EttrlServerAdapter: verl's rollout class inside the rollout worker process; it owns the engine.

It holds an engine.LLM and the engine's HTTP app (engine.serve: /v1/completions, /v1/chat/completions,
/v1/sample_tree, /health, /get_weight_version; the state-changing admin routes stay off) on one engine loop
thread, served on this node's address once EttrlReplica asks (serve()). verl's calls map to the engine's:

    update_weights(named tensors)  -> LLM.update_weights, on the engine loop once no request is in flight
    release()                      -> LLM.sleep(2)   (requests arriving meanwhile wait)
    resume(["weights"])            -> LLM.wake_up(["weights"]);  resume(["kv_cache"]) -> LLM.wake_up(["kv_cache"])

EttrlHttpServer reaches the control methods (sleep, wake_up, abort, ...) through Ray's actor.__ray_call__ on
the worker (call_adapter below) and generation through HTTP. One engine process per replica (tp = dp = pp = 1).
"""
from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from collections.abc import AsyncIterable, Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.utils import ensure_async_iterator

from engine import LLM
from engine.serve import admin
from engine.serve.api_server import Server, ServerConfig
from engine.serve.engine_loop import PauseMode
from engine.serve.errors import ApiError
from ettrl.integrations.verl.net import node_address
from ettrl.integrations.verl.options import EttrlRolloutOptions

if TYPE_CHECKING:  # annotations only (Any where verl is not installed)
    from fastapi import FastAPI
    from torch.distributed.device_mesh import DeviceMesh
    from verl.workers.config import HFModelConfig, RolloutConfig

# what verl streams to update_weights and its checkpoint engines: (HF name, tensor) pairs, sync or async
NamedWeights = Iterable[tuple[str, torch.Tensor]] | AsyncIterable[tuple[str, torch.Tensor]]
T = TypeVar("T")
SLEEP_LEVEL = 2  # vLLM's in verl: weights leave the device too (on the CPU they stay where they are)


class EttrlServerAdapter(BaseRollout):
    def __init__(self, config: RolloutConfig, model_config: HFModelConfig, device_mesh: DeviceMesh | None = None,
                 replica_rank: int = -1, **kwargs: Any) -> None:
        super().__init__(config, model_config, device_mesh)
        parallel = (self.config.tensor_model_parallel_size * self.config.data_parallel_size
                    * self.config.pipeline_model_parallel_size)
        if parallel != 1:
            raise ValueError(f"rollout.name=ettrl runs one engine process per replica: set "
                             f"actor_rollout_ref.rollout.tensor_model_parallel_size (and data_ / pipeline_"
                             f"model_parallel_size) to 1, got tp x dp x pp = {parallel}")
        self.options = EttrlRolloutOptions.from_rollout_config(self.config)
        self.replica_rank = replica_rank if device_mesh is None else device_mesh["dp"].get_local_rank()
        self.is_leader_rank = True
        self.llm = LLM(self.model_config.local_path, **engine_options(self.config, self.options))
        self.host = node_address()
        self.server = Server(self.llm, ServerConfig(host=self.host,
                                                    logprobs_mode=self.config.logprobs_mode or "processed_logprobs"))
        self.server.loop.start()  # the HTTP app runs with lifespan off: the loop lives as long as the adapter
        self._pauses: set[str] = set()
        self._lock = threading.Lock()
        self._http: _HttpThread | None = None

    # ---- HTTP ---------------------------------------------------------------------------------------------------
    def serve(self) -> tuple[str, int]:
        """Serves the engine's routes on this node's address (once): (host, port)."""
        if self._http is None:
            self._http = _HttpThread(self.server.app, self.host)
        return self.host, self._http.port

    # ---- verl's BaseRollout -------------------------------------------------------------------------------------
    async def resume(self, tags: list[str]) -> None:
        if self.config.free_cache_engine:
            await asyncio.to_thread(self.wake_up, list(tags))

    async def release(self) -> None:
        if self.config.free_cache_engine:
            await asyncio.to_thread(self.sleep, SLEEP_LEVEL)

    async def update_weights(self, weights: NamedWeights, wire_format: str = "named_tensors",
                             global_steps: int | None = None, **kwargs: Any) -> int:
        """The named tensors go in as the server's own weight routes put them (engine.serve.admin.update_weights):
        once no request is in flight, every name, shape and value checked before any is written, so a bad stream
        leaves the old weights whole; the weight version advances by one, named after verl's global step."""
        if wire_format != "named_tensors":
            raise ValueError(f"the ettrl rollout takes full named tensors (wire_format='named_tensors'), got "
                             f"{wire_format!r}: use a checkpoint engine that sends them (naive, nccl, gloo)")
        # a host copy: the stream may reuse its buffers, and on a GPU the trainer's memory is not ours to double
        tensors = {name: t.detach().to("cpu", copy=True) async for name, t in ensure_async_iterator(weights)}
        name = None if global_steps is None else str(global_steps)
        try:
            reply = await admin.update_weights(self.server, tensors, "wait", name)
        except ApiError as e:
            raise ValueError(f"update_weights: {e.message}; nothing was written") from None
        return reply["num_tensors"]

    # ---- control, from EttrlHttpServer (sync: they wait on the engine loop) --------------------------------------
    def sleep(self, level: int = SLEEP_LEVEL) -> None:
        self._pause("sleep", "wait")
        _wait(self.server.loop.barrier(lambda: self.llm.sleep(level)))

    def wake_up(self, tags: list[str] | None = None) -> None:
        _wait(self.server.loop.barrier(lambda: self.llm.wake_up(tags)))
        if self.awake:
            self._unpause("sleep")

    @property
    def awake(self) -> bool:
        return not self.llm.engine.asleep and not self.llm.engine.runner.weights_offloaded

    def release_kv_cache(self) -> None:
        """Frees the KV pool only (LLM.sleep(1)); requests wait until resume_kv_cache."""
        if not self.llm.engine.asleep:
            self.sleep(1)

    def resume_kv_cache(self) -> None:
        if self.llm.engine.asleep:
            self.wake_up(["kv_cache"])

    def abort_all_requests(self) -> None:
        """Requests in flight fail (their clients see 'aborted'); new ones wait for resume_generation."""
        self._pause("abort", "abort")

    def resume_generation(self) -> None:
        self._unpause("abort")

    def clear_kv_cache(self) -> None:
        """Empties the prefix cache (nothing to do asleep: the pool comes back empty)."""
        def reset() -> None:
            if self.llm.engine.kv is not None:
                self.llm.engine.kv.reset_prefix_cache()
        _wait(self.server.loop.barrier(reset))

    def weight_version(self) -> str:
        return str(self.server.weights.number)

    def weight_digests(self) -> dict[str, str]:
        """sha256 of each weight's bytes by Hugging Face name (tests compare them with the trainer's)."""
        views = self.llm.engine.runner.model.hf_parameter_views()
        return {name: hashlib.sha256(_bytes_of(v)).hexdigest() for name, v in views.items()}

    def _pause(self, reason: str, mode: PauseMode) -> None:
        with self._lock:
            first = not self._pauses
            self._pauses.add(reason)
        if first or mode == "abort":
            _wait(self.server.loop.pause(mode))

    def _unpause(self, reason: str) -> None:
        with self._lock:
            self._pauses.discard(reason)
            resume = not self._pauses
        if resume:
            _wait(self.server.loop.resume())

    def shutdown(self) -> None:
        if self._http is not None:
            self._http.stop()
        self.server.loop.stop()


def call_adapter(worker: object, method: str, *args: Any) -> Any:
    """Runs adapter.method(*args) in a rollout worker, through worker.__ray_call__ (verl's worker classes expose no
    method of ours): CheckpointEngineWorker keeps it as .server_adapter, the hybrid engine worker as .rollout."""
    adapter = getattr(worker, "server_adapter", None) or getattr(worker, "rollout", None)
    if not isinstance(adapter, EttrlServerAdapter):
        raise RuntimeError(f"this rollout worker holds {type(adapter).__name__}, not an EttrlServerAdapter; is "
                           f"actor_rollout_ref.rollout.name=ettrl?")
    return getattr(adapter, method)(*args)  # whatever that method returns (Ray sends it back)


def engine_options(config: RolloutConfig, options: EttrlRolloutOptions) -> dict[str, Any]:
    """engine.LLM's keyword arguments from verl's rollout config; engine_kwargs.ettrl.engine wins."""
    out = dict(dtype=config.dtype, max_num_seqs=config.max_num_seqs,
               max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=config.max_model_len,
               enable_prefix_caching=config.enable_prefix_caching,
               enable_chunked_prefill=config.enable_chunked_prefill)
    if torch.cuda.is_available():
        out["gpu_memory_utilization"] = config.gpu_memory_utilization
    return {**out, **options.engine}


def _wait(future: Future[T], timeout_s: float = 3600.0) -> T:
    return future.result(timeout_s)


def _bytes_of(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes, flat (for a digest)."""
    return tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()


class _HttpThread:
    """uvicorn on a socket bound here (so the port is known at once), in a daemon thread."""

    def __init__(self, app: FastAPI, host: str) -> None:
        import uvicorn

        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, 0))
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(app, lifespan="off", log_level="warning", timeout_keep_alive=60)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="ettrl-http", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
