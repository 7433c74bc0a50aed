"""EttrlHttpServer: the Ray actor verl's load balancer and replica talk to, one per EttrlReplica.

Generation goes over HTTP to the engine routes the rollout worker serves (token ids in, token ids, log-
probabilities and the stop reason out; trees through /v1/sample_tree); control (sleep, wake_up, abort, cache
resets) goes to the worker's EttrlServerAdapter through Ray. Mode rules as verl's vLLM server: in hybrid mode the
trainer wakes the engine itself (resume), so wake_up here refuses; standalone servers never sleep.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import httpx
import ray
from verl.workers.rollout.replica import RolloutMode, TokenOutput

from ettrl.integrations.verl.adapter import call_adapter

if TYPE_CHECKING:  # annotations only (Any where verl and ray are not installed)
    from ray.actor import ActorHandle
    from verl.workers.config import RolloutConfig

log = logging.getLogger("ettrl.integrations.verl")
ABORTED = "aborted"


class EttrlHttpServer:
    def __init__(self, config: RolloutConfig, rollout_mode: RolloutMode, worker: ActorHandle, replica_rank: int,
                 address: str) -> None:
        self.config, self.rollout_mode, self.worker, self.replica_rank = config, rollout_mode, worker, replica_rank
        self.address = address
        self.global_steps: int | None = None
        self.num_requests = {"generate": 0, "sample_tree": 0}
        self._rejecting = False
        self._client: httpx.AsyncClient | None = None

    # ---- generation --------------------------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], sampling_params: dict[str, Any], request_id: str,
                       image_data: list[Any] | None = None, video_data: list[Any] | None = None,
                       audio_data: list[Any] | None = None, mm_processor_kwargs: dict[str, Any] | None = None,
                       priority: int = 0, **kwargs: Any) -> TokenOutput:
        """One sample of prompt_ids (verl's token-in-token-out call); sampling_params as verl's agent loops send
        them, plus an optional "seed"."""
        if image_data or video_data or audio_data:
            raise ValueError("the ettrl rollout serves text models only: this request carries images/video/audio")
        self.num_requests["generate"] += 1
        if self._rejecting:
            return self._aborted()
        params = dict(sampling_params)
        want_logprobs = bool(params.pop("logprobs", False))
        body = {"prompt": [int(t) for t in prompt_ids], "n": 1, "return_token_ids": True,
                "max_tokens": self.max_tokens(len(prompt_ids), params), **engine_sampling(params)}
        if want_logprobs:
            body["logprobs"] = 0
        status, reply = await self._post("/v1/completions", body)
        if status == 503 and "Aborted" in reply.get("error", {}).get("message", ""):
            return self._aborted()
        _raise_for(status, reply, "/v1/completions")
        choice = reply["choices"][0]
        log_probs = choice["logprobs"]["token_logprobs"] if want_logprobs else None
        return TokenOutput(token_ids=choice["token_ids"], log_probs=log_probs, stop_reason="completed",
                           extra_fields={"global_steps": self.global_steps, "finish_reason": choice["finish_reason"]})

    async def sample_tree(self, prompt_ids: list[int], sampling_params: dict[str, Any], tree: dict) -> dict:
        """One ETMR tree set of prompt_ids: the /v1/sample_tree result of that prompt (leaves with token ids,
        logprobs, entropies, finish reasons and origins; stats); {"aborted": True} when it was aborted."""
        self.num_requests["sample_tree"] += 1
        if self._rejecting:
            return {"aborted": True}
        params = dict(sampling_params)
        params.pop("logprobs", None)  # leaves always carry their log-probabilities
        body = {"prompts": [[int(t) for t in prompt_ids]], "max_tokens": self.max_tokens(len(prompt_ids), params),
                **engine_sampling(params), **tree}
        status, reply = await self._post("/v1/sample_tree", body)
        if status == 503 and "Aborted" in reply.get("error", {}).get("message", ""):
            return {"aborted": True}
        _raise_for(status, reply, "/v1/sample_tree")
        result = reply["results"][0]
        result["global_steps"] = self.global_steps
        return result

    async def generate_group(self, prompt_ids: list[int], sampling_params: dict[str, Any], n: int) -> dict:
        """n parallel samples of prompt_ids in one request (one prefill), in sample_tree's result shape."""
        self.num_requests["generate"] += 1
        if self._rejecting:
            return {"aborted": True}
        params = dict(sampling_params)
        params.pop("logprobs", None)
        body = {"prompt": [int(t) for t in prompt_ids], "n": n, "return_token_ids": True, "return_entropies": True,
                "logprobs": 0, "max_tokens": self.max_tokens(len(prompt_ids), params), **engine_sampling(params)}
        status, reply = await self._post("/v1/completions", body)
        if status == 503 and "Aborted" in reply.get("error", {}).get("message", ""):
            return {"aborted": True}
        _raise_for(status, reply, "/v1/completions")
        leaves = [{"token_ids": c["token_ids"], "logprobs": c["logprobs"]["token_logprobs"],
                   "entropies": c["entropies"], "finish_reason": c["finish_reason"]} for c in reply["choices"]]
        return {"leaves": leaves, "global_steps": self.global_steps}

    def max_tokens(self, prompt_len: int, params: dict) -> int:
        """As verl's vLLM server: the caller's max_tokens, else what response_length and prompt_length leave."""
        limit = params.pop("max_tokens", None) or params.pop("max_new_tokens", None)
        if limit is None:
            limit = min(self.config.response_length,
                        self.config.prompt_length + self.config.response_length - prompt_len)
        return max(1, int(limit))

    async def _post(self, path: str, body: dict) -> tuple[int, dict]:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=f"http://{self.address}", timeout=None,
                                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        response = await self._client.post(path, json=body)
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, {"error": {"message": response.text}}

    async def weight_version(self) -> str:
        response = await self._get("/get_weight_version")
        return response["weight_version"]

    async def health(self) -> dict:
        return await self._get("/health")

    async def _get(self, path: str) -> dict:
        async with httpx.AsyncClient(base_url=f"http://{self.address}", timeout=60) as client:
            response = await client.get(path)
        _raise_for(response.status_code, response.json(), path)
        return response.json()

    def _aborted(self) -> TokenOutput:
        return TokenOutput(token_ids=[], log_probs=None, stop_reason=ABORTED,
                           extra_fields={"global_steps": self.global_steps})

    # ---- control -----------------------------------------------------------------------------------------------
    async def _call(self, method: str, *args: Any) -> Any:
        return await self.worker.__ray_call__.remote(call_adapter, method, *args)

    async def wake_up(self) -> None:
        if self.rollout_mode == RolloutMode.HYBRID:
            raise ValueError("in hybrid mode the trainer wakes the ettrl engine itself (EttrlServerAdapter.resume)")
        if self.rollout_mode == RolloutMode.COLOCATED:
            await self._call("wake_up", None)

    async def sleep(self) -> None:
        if self.config.free_cache_engine and self.rollout_mode != RolloutMode.STANDALONE:
            await self._call("sleep")

    async def abort_all_requests(self, reject_request: bool = False) -> None:
        self._rejecting = reject_request
        await self._call("abort_all_requests")

    async def resume_generation(self) -> None:
        self._rejecting = False
        await self._call("resume_generation")

    async def clear_kv_cache(self) -> None:
        await self._call("clear_kv_cache")

    async def release_kv_cache(self) -> None:
        if self.config.free_cache_engine:
            await self._call("release_kv_cache")

    async def resume_kv_cache(self) -> None:
        await self._call("resume_kv_cache")

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def start_profile(self, **kwargs: Any) -> None:
        log.warning("the ettrl rollout has no profiler hook; start_profile ignored")

    async def stop_profile(self) -> None:
        pass

    def get_server_address(self) -> tuple[str, int]:
        host, port = self.address.rsplit(":", 1)
        return host, int(port)

    def request_counts(self) -> dict[str, int]:
        return dict(self.num_requests)


def engine_sampling(params: dict) -> dict:
    """verl's sampling params -> the engine route's fields (temperature, top_p, top_k, seed, stop, stop_token_ids,
    ignore_eos); anything the engine cannot honour is refused rather than ignored."""
    params = dict(params)
    penalty = params.pop("repetition_penalty", 1.0)
    if penalty not in (None, 1.0):
        raise ValueError(f"the ettrl engine has no repetition penalty: set actor_rollout_ref.rollout."
                         f"repetition_penalty=1.0 (got {penalty})")
    out = {key: params.pop(key) for key in ("temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                                            "ignore_eos") if key in params and params[key] is not None}
    if out.get("top_k") == 0:
        out["top_k"] = -1
    params.pop("n", None)
    if params:
        raise ValueError(f"the ettrl rollout does not support the sampling parameters {sorted(params)}")
    return out


def _raise_for(status: int, reply: dict, route: str) -> None:
    if status != 200:
        message = reply.get("error", {}).get("message", reply)
        raise RuntimeError(f"the ettrl engine's {route} answered HTTP {status}: {message}")


def make_server_actor(**options: Any) -> Any:
    """EttrlHttpServer as a Ray actor class with `options` (scheduling, concurrency); Ray types it loosely."""
    return ray.remote(EttrlHttpServer).options(**options)
