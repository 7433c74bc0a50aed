"""Routes that change the server's state: weight updates, prefix-cache resets, pause/resume, sleep/wake_up.

Off unless the server runs with --enable-weight-updates (each answers 403 then). Each runs on the engine loop as
a barrier, once no request is in flight: `if_busy=wait` (the default, as SGLang's update lock: new requests wait
behind it) or `if_busy=refuse` (409 while requests are in flight). Weights load only from safetensors files
under --weights-dir (no '..', no symlink out of it) and are checked against the model's names and shapes, and
for floating dtypes and finite values, before any is written; every update empties the prefix cache, so no
prefix computed with old weights is reused, advances the weight version and runs the health canary.

`admin_router(host)` builds them as a FastAPI APIRouter over an `AdminHost`: what the routes need of the server,
named here, so this module never imports the server's.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from fastapi import APIRouter, Query, Request
from safetensors import safe_open

from engine.gpu_memory import DeviceMemoryError
from engine.llm_engine import wake_up_tags
from engine.models.loader import check_named_tensors, safetensors_files
from engine.serve.engine_loop import Busy, EngineLoop, IfBusy
from engine.serve.errors import ApiError
from engine.serve.guards import require_content_type
from engine.serve.protocol import RequestBody, UpdateWeightsFromDiskRequest

if TYPE_CHECKING:  # annotations only
    import torch

    from engine.llm import LLM
    from engine.serve.config import ServerConfig

IF_BUSY = ("wait", "refuse")
Body = TypeVar("Body", bound=RequestBody)


@dataclass
class WeightVersion:
    """The served weights' version: a counter every update advances, and the name the last update gave, if any."""
    number: int = 0
    name: str | None = None

    def advance(self, name: str | None) -> None:
        self.number += 1
        self.name = name

    def info(self) -> dict[str, str | None]:
        """GET /get_weight_version's body (SGLang's names)."""
        return {"weight_version": str(self.number), "weight_version_name": self.name}


class AdminHost(Protocol):
    """What the admin routes need of the server (api_server.Server is one): the model, its engine loop, the
    settings, the weight version, and the server's body reading and parsing (size caps, Content-Type, JSON)."""

    @property
    def llm(self) -> LLM: ...

    @property
    def loop(self) -> EngineLoop: ...

    @property
    def config(self) -> ServerConfig: ...

    @property
    def weights(self) -> WeightVersion: ...

    async def read_body(self, request: Request, limit_bytes: int) -> bytes: ...

    async def parse(self, request: Request, model: type[Body]) -> Body: ...


def confined_safetensors(weights_dir: str | None, model_path: str) -> list[Path]:
    """The safetensors files of model_path, each resolved (symlinks followed) inside weights_dir. Messages name
    paths as the client gave them, never as they resolve on this machine."""
    if weights_dir is None:
        raise ApiError(403, "update_weights_from_disk reads only under --weights-dir, and the server has none")
    if "\0" in model_path:
        raise ApiError(400, "model_path holds a null byte; give a directory name under --weights-dir")
    base = Path(weights_dir).resolve(strict=True)
    if ".." in Path(model_path).parts:
        raise ApiError(403, f"model_path {model_path!r} contains '..'; give a directory under --weights-dir")
    target = (base / model_path).resolve()
    if not target.is_relative_to(base):
        raise ApiError(403, f"model_path {model_path!r} resolves outside --weights-dir")
    if not target.is_dir():
        raise ApiError(400, f"model_path {model_path!r} is not a directory under --weights-dir")
    try:
        files = [f.resolve() for f in safetensors_files(target)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # a missing or malformed index
        raise ApiError(400, f"cannot list the weights of {model_path!r}: {type(e).__name__}: {e}") from None
    for f in files:
        if not f.is_relative_to(base):
            raise ApiError(403, f"a weight file of {model_path!r} is outside --weights-dir (a symlink or an "
                                f"index entry)")
        if f.suffix != ".safetensors" or not f.is_file():
            raise ApiError(400, f"weight file {f.relative_to(base)} is not a safetensors file")
    return files


def read_safetensors(files: list[Path], base: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors.update((name, f.get_tensor(name)) for name in f.keys())  # noqa: SIM118 - not a dict
        except Exception as e:  # noqa: BLE001 - truncated, malformed, a header too large: the client's file
            raise ApiError(400, f"cannot read {path.relative_to(base)} as safetensors: {e}") from None
    return tensors


def check_tensors(host: AdminHost, tensors: dict[str, torch.Tensor]) -> None:
    """Every name known, every shape right, floating-point and finite, before any weight is written."""
    if not tensors:
        raise ApiError(400, "no tensors to load")
    try:
        check_named_tensors(host.llm.engine.runner.model.hf_parameter_views(), tensors.items())
    except KeyError as e:
        raise ApiError(400, e.args[0]) from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None


async def barrier(host: AdminHost, fn: Callable[[], Any], if_busy: str = "wait") -> Any:
    if if_busy not in IF_BUSY:
        raise ApiError(400, f"if_busy must be one of {IF_BUSY}, got {if_busy!r}")
    checked: IfBusy = "refuse" if if_busy == "refuse" else "wait"
    try:
        return await asyncio.wrap_future(host.loop.barrier(fn, checked))
    except Busy as e:
        raise ApiError(409, str(e)) from None


async def update_weights(host: AdminHost, tensors: dict[str, torch.Tensor], if_busy: str,
                         name: str | None) -> dict[str, Any]:
    await asyncio.to_thread(check_tensors, host, tensors)

    def apply() -> int:
        written = host.llm.update_weights(tensors)  # also empties the prefix cache
        host.weights.advance(name)
        host.loop.check_health()
        return written

    written = await barrier(host, apply, if_busy)
    return {"success": True, "message": f"updated {written} tensors", "num_tensors": written, **host.weights.info()}


def admin_router(host: AdminHost) -> APIRouter:
    """The admin routes, each answering 403 unless the server runs with --enable-weight-updates."""
    router = APIRouter()
    cfg = host.config

    def require_enabled() -> None:
        if not cfg.enable_weight_updates:
            raise ApiError(403, "this route changes the server's state; start the server with "
                                "--enable-weight-updates to allow it")

    @router.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> dict[str, Any]:
        require_enabled()
        req = await host.parse(request, UpdateWeightsFromDiskRequest)
        files = confined_safetensors(cfg.weights_dir, req.model_path)
        base = Path(cfg.weights_dir or "").resolve()  # confined_safetensors refused a server without one
        tensors = await asyncio.to_thread(read_safetensors, files, base)
        return await update_weights(host, tensors, req.if_busy, req.weight_version)

    @router.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(request: Request, if_busy: str = "wait",
                                         weight_version: str | None = None) -> dict[str, Any]:
        """Body: a safetensors file (safetensors.torch.save(state_dict)) of HF-named tensors."""
        require_enabled()
        require_content_type(request, "application/octet-stream")
        from safetensors.torch import load
        body = await host.read_body(request, int(cfg.max_weights_body_gb * 2**30))
        try:
            tensors = await asyncio.to_thread(load, body)
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's
            raise ApiError(400, f"the body is not a safetensors file of named tensors: {e}") from None
        return await update_weights(host, tensors, if_busy, weight_version)

    async def reset_prefix_cache(if_busy: str = "wait") -> dict[str, Any]:
        require_enabled()
        await barrier(host, host.llm.engine.reset_prefix_cache, if_busy)
        return {"success": True, "message": "prefix cache emptied"}

    router.post("/reset_prefix_cache")(reset_prefix_cache)
    router.post("/flush_cache")(reset_prefix_cache)  # SGLang's name

    @router.post("/pause")
    async def pause(mode: str = "wait") -> dict[str, Any]:
        require_enabled()
        if mode not in ("wait", "abort"):
            raise ApiError(400, f"mode must be 'wait' (finish the requests in flight) or 'abort', got {mode!r}")
        await asyncio.wrap_future(host.loop.pause("abort" if mode == "abort" else "wait"))
        return {"success": True, "paused": True}

    @router.post("/resume")
    async def resume() -> dict[str, Any]:
        require_enabled()
        await asyncio.wrap_future(host.loop.resume())
        return {"success": True, "paused": False}

    @router.post("/sleep")
    async def sleep(level: int = 1) -> dict[str, Any]:
        """vLLM's sleep mode (LLM.sleep: level 1 frees the KV pool, 2 also offloads weights on a GPU); requests
        wait (held) until /wake_up."""
        require_enabled()
        if level not in (1, 2):
            raise ApiError(400, f"level must be 1 or 2, got {level}")
        await asyncio.wrap_future(host.loop.pause("wait"))
        await barrier(host, lambda: host.llm.sleep(level))
        return {"success": True, "sleeping": True}

    @router.post("/wake_up")
    async def wake_up(tags: list[str] | None = Query(None)) -> dict[str, Any]:
        """vLLM's tags (`?tags=weights`, `?tags=kv_cache`, none: both; weights first). Requests resume once the
        engine is whole again; 503 when a part does not fit in the device's free memory (still asleep)."""
        require_enabled()
        try:
            wake_up_tags(tags)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        try:
            await barrier(host, lambda: host.llm.wake_up(tags))
        except DeviceMemoryError as e:
            raise ApiError(503, str(e)) from None
        engine = host.llm.engine
        sleeping = engine.asleep or engine.runner.weights_offloaded
        if not sleeping:
            await asyncio.wrap_future(host.loop.resume())
        return {"success": True, "sleeping": sleeping}

    return router
