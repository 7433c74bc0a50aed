"""The FastAPI app: OpenAI-compatible generation routes, tree sampling, info routes; admin routes in admin.py.

Handlers validate a request before anything is queued (Content-Type, body size, JSON, Unicode, pydantic, the
fields the engine does not implement, the queue's room, the request's fan-out, the prompt's length in characters,
then the engine's own checks), so bad input answers 4xx and touches no engine state; prompts are tokenized off
the event loop; then they submit a job to the engine loop and await its events.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from engine.progress import Progress
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.serve.admin import Body, WeightVersion, admin_router
from engine.serve.config import ServerConfig
from engine.serve.engine_loop import EngineLoop
from engine.serve.errors import ApiError, error_response, install_error_handlers
from engine.serve.guards import ApiKeyMiddleware, HostOriginMiddleware, require_content_type, warn_if_open
from engine.serve.jobs import Emit, Event, GenerateJob, Job, Requests, TreeJob
from engine.serve.limits import Limits, check_unicode
from engine.serve.openai_format import Formatter, Options, StreamState, new_id, sse, tree_response
from engine.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    SampleTreeRequest,
    SamplingFields,
)
from engine.tree import TreeParams, TreeRun

if TYPE_CHECKING:  # annotations only
    from engine.llm import LLM, Prompt

__all__ = ["Server", "ServerConfig", "build_app", "model_name"]
log = logging.getLogger("engine.serve")
DISCONNECT_POLL_S = 0.2
RETRY_AFTER_S = 1


class Server:
    """Owns the LLM, its engine loop and the app (an admin.AdminHost for the admin routes)."""

    def __init__(self, llm: LLM, config: ServerConfig) -> None:
        self.llm, self.engine = llm, llm.engine
        self.config = config if config.model_name else replace(config, model_name=model_name(llm.config.model))
        self.limits = Limits.of(llm, self.config)
        self.loop = EngineLoop(llm)
        self.fmt = Formatter(llm)
        self.weights = WeightVersion()  # advanced by every weight update (admin.py)
        self.app = build_app(self)
        warn_if_open(self.config.host, self.config.api_key, self.config.enable_weight_updates)

    @property
    def served_name(self) -> str:
        """The model's name clients give (the config's, filled in at start when it had none)."""
        assert self.config.model_name is not None
        return self.config.model_name

    @property
    def weight_version(self) -> int:
        """The weights' version counter (self.weights.number), read-only: weight updates advance it."""
        return self.weights.number

    # ---- request bodies ------------------------------------------------------------------------------------
    async def read_body(self, request: Request, limit_bytes: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit_bytes:
            raise ApiError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit_bytes}")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit_bytes:
                    raise ApiError(413, f"request body exceeds the limit of {limit_bytes} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(400, "the client went away before sending its whole body") from None
        return b"".join(chunks)

    async def parse(self, request: Request, model: type[Body]) -> Body:
        require_content_type(request, "application/json")
        raw = await self.read_body(request, self.limits.body_bytes)
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ApiError(400, f"the request body is not UTF-8 ({e}); send JSON text") from None
        except json.JSONDecodeError as e:
            raise ApiError(400, f"malformed JSON in the request body: {e}") from None
        except RecursionError:
            raise ApiError(400, "the request body nests JSON too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        check_unicode(body)
        try:
            req = model.model_validate(body)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
            raise ApiError(400, f"invalid request: {problems}") from None
        unknown = req.unknown_fields()
        if unknown and self.config.reject_unknown_fields:
            raise ApiError(400, f"unknown fields {unknown} (the server runs with --reject-unknown-fields)")
        if unknown:
            log.warning("ignoring unknown request fields %s", unknown)
        if isinstance(req, SamplingFields) and (fields := req.not_implemented()):
            raise ApiError(400, f"the engine does not implement {', '.join(fields)}: leave "
                                f"{'it' if len(fields) == 1 else 'them'} at the default")
        requested = getattr(req, "model", None)
        if requested not in (None, self.config.model_name):
            raise ApiError(404, f"the model {requested!r} does not exist; this server serves "
                                f"{self.config.model_name!r}")
        return req

    def check_queue(self) -> None:
        queued = self.loop.num_queued
        if queued >= self.config.max_queued_requests:
            raise ApiError(429, f"{queued} requests are waiting for the engine (--max-queued-requests "
                                f"{self.config.max_queued_requests}); retry later",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    # ---- building jobs -------------------------------------------------------------------------------------
    def sampling_params(self, req: SamplingFields, prompt_len: int, max_tokens: int | None, logprobs: int | None,
                        n: int | None = None) -> SamplingParams:
        room = self.engine.max_model_len - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt has {prompt_len} tokens and the model's max length is "
                                f"{self.engine.max_model_len} (prompt plus at least one new token): shorten the prompt")
        if max_tokens is None:
            max_tokens = 16 if isinstance(req, CompletionRequest) else max(1, room)
        if max_tokens > room:
            raise ApiError(400, f"this model's maximum context length is {self.engine.max_model_len} tokens; "
                                f"the prompt has {prompt_len} and max_tokens asks for {max_tokens}: lower max_tokens "
                                f"to {max(room, 0)} or shorten the prompt")
        try:
            return SamplingParams(n=req.n if n is None else n, temperature=req.temperature, top_p=req.top_p,
                                  top_k=-1 if req.top_k == 0 else req.top_k,  # vLLM: 0 or -1 disables top-k
                                  max_tokens=max_tokens, stop=req.stop, stop_regex=req.stop_regex,
                                  include_stop_str_in_output=req.include_stop_str_in_output,
                                  stop_token_ids=req.stop_token_ids or [],
                                  seed=req.seed, ignore_eos=req.ignore_eos, logprobs=self._recorded(logprobs),
                                  logprobs_mode=self.config.logprobs_mode)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def _recorded(self, logprobs: int | None) -> int | None:
        """What the engine must record: nothing extra for logprobs=0 in the sampler's own distribution."""
        if logprobs == 0 and self.config.logprobs_mode == "processed_logprobs":
            return None
        return logprobs

    async def encode(self, prompt: Prompt, what: str = "the prompt") -> list[int]:
        """Token ids of a prompt; a text is bounded in characters first and tokenized off the event loop."""
        if isinstance(prompt, str):
            self.limits.check_chars(len(prompt), what)
            try:
                ids = await asyncio.to_thread(self.llm.encode, prompt)
            except ValueError as e:
                raise ApiError(400, str(e)) from None
        else:
            ids = list(prompt)
        if not ids:
            raise ApiError(400, "empty prompt: give at least one token (or non-empty text)")
        return ids

    async def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [m.flat() for m in req.messages]
        self.limits.check_chars(sum(len(m.get("content") or "") for m in messages), "the conversation")
        try:
            text = await asyncio.to_thread(self.llm.apply_chat_template, messages)
        except Exception as e:  # noqa: BLE001 - no tokenizer, no template, or a template that refuses
            raise ApiError(400, f"cannot apply the model's chat template: {e}") from None
        return await self.encode(text, "the conversation after the chat template")

    def sequences(self, ids: list[int], params: SamplingParams, seed: int | None = None) -> list[Sequence]:
        try:
            return self.engine.make_sequences(ids, params, seed)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        except RuntimeError as e:  # asleep (POST /sleep): no KV pool to check the request against
            raise ApiError(503, f"{e} (POST /wake_up)") from None

    def options(self, kind: str, req: GenerationRequest, logprobs: int | None) -> Options:
        return Options(model=self.served_name, kind=kind, logprobs=logprobs,
                       raw_logprobs=self.config.logprobs_mode == "raw_logprobs",
                       return_token_ids=req.return_token_ids, return_entropies=req.return_entropies,
                       include_usage=bool(req.stream_options and req.stream_options.include_usage),
                       tokens_as_ids=req.return_tokens_as_token_ids,
                       id=new_id("chatcmpl" if kind == "chat" else "cmpl"))

    # ---- running jobs --------------------------------------------------------------------------------------
    async def run(self, request: Request, make_job: Callable[[Emit], Job],
                  on_done: Callable[[Any], dict[str, Any]]) -> Response:
        """Submits the job and answers with on_done(result); a client that goes away aborts it."""
        events, job = self._job(make_job)
        self.loop.submit(job)
        try:
            kind, payload = await self._next_event(request, events)
        except ConnectionAbortedError:  # the client went away: free its sequences
            self.loop.abort(job)
            return Response(status_code=499)
        except BaseException:
            self.loop.abort(job)
            raise
        if kind == "error":
            return error_response(*payload)
        return JSONResponse(on_done(payload))

    def stream(self, make_job: Callable[[Emit], Job], state: StreamState) -> StreamingResponse:
        events, job = self._job(make_job)

        async def chunks() -> AsyncIterator[str]:
            ended = False
            self.loop.submit(job)
            try:
                while True:
                    kind, payload = await events.get()
                    if kind == "delta":
                        for chunk in state.chunks(payload):
                            yield chunk
                        continue
                    ended = True
                    if kind == "error":
                        status, message = payload
                        yield sse({"error": {"message": message, "type": "ServerError", "code": status}})
                    elif (usage := state.usage_chunk()) is not None:
                        yield usage
                    yield "data: [DONE]\n\n"
                    return
            finally:
                if not ended:  # the client disconnected: free its sequences
                    self.loop.abort(job)

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @staticmethod
    def _job(make_job: Callable[[Emit], Job]) -> tuple[asyncio.Queue[Event], Job]:
        events: asyncio.Queue[Event] = asyncio.Queue()
        aloop = asyncio.get_running_loop()
        return events, make_job(lambda event: aloop.call_soon_threadsafe(events.put_nowait, event))

    @staticmethod
    async def _next_event(request: Request, events: asyncio.Queue[Event]) -> Event:
        while True:
            try:
                return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    raise ConnectionAbortedError("client disconnected") from None


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    """A completions request's prompts: one text or token-id list, or a list of them."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty: give a text, a list of texts, token ids or a list of token-id lists")
    if isinstance(prompt[0], int):
        return [prompt]
    return cast("list[Prompt]", list(prompt))


def build_app(server: Server) -> FastAPI:
    app = FastAPI(title="ETTRL engine", lifespan=_lifespan(server))
    llm, cfg = server.llm, server.config
    install_error_handlers(app)
    if cfg.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=cfg.api_key)
    app.add_middleware(HostOriginMiddleware, bind_host=cfg.host, allowed_hosts=cfg.allowed_hosts)  # outermost

    @app.get("/health", response_model=None)
    async def health() -> dict[str, str] | JSONResponse:
        if server.loop.is_alive and server.loop.healthy:
            return {"status": "ok"}
        return JSONResponse({"status": "unhealthy"}, 503)

    @app.get("/v1/models", response_model=None)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "ettrl", "root": cfg.model_name,
                                            "max_model_len": server.engine.max_model_len}]}

    @app.get("/get_world_size", response_model=None)
    async def world_size() -> dict[str, int]:
        return {"world_size": 1}

    @app.get("/get_weight_version", response_model=None)
    async def weight_version() -> dict[str, str | None]:
        return server.weights.info()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await server.parse(request, CompletionRequest)
        if req.echo:
            raise ApiError(400, "echo=true is not supported; the prompt is in prompt_token_ids (return_token_ids)")
        server.check_queue()
        prompts = _prompt_list(req.prompt)
        server.limits.check_sequences(len(prompts) * req.n, f"{len(prompts)} prompts x n = {req.n}")
        requests = []
        for prompt in prompts:
            ids = await server.encode(prompt)
            params = server.sampling_params(req, len(ids), req.max_tokens, req.logprobs)
            requests.append((ids, server.sequences(ids, params)))
        return await _generate(server, request, req, requests, server.options("completion", req, req.logprobs))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await server.parse(request, ChatCompletionRequest)
        server.check_queue()
        server.limits.check_sequences(req.n, f"n = {req.n}")
        ids = await server.chat_prompt(req)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = server.sampling_params(req, len(ids), req.max_completion_tokens or req.max_tokens, logprobs)
        return await _generate(server, request, req, [(ids, server.sequences(ids, params))],
                               server.options("chat", req, logprobs))

    @app.post("/v1/sample_tree")
    async def sample_tree(request: Request) -> Response:
        req = await server.parse(request, SampleTreeRequest)
        if req.n != 1:
            raise ApiError(400, f"sample_tree takes n=1 (the tree's size is trees x (1 + forks x branches)), "
                                f"got {req.n}")
        try:
            tree = TreeParams(req.trees, req.forks, req.branches, req.metric, req.distinct, req.no_fork_after,
                              req.min_gap, req.branch_after_all_roots)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        server.check_queue()
        server.limits.check_sequences(len(req.prompts) * tree.num_leaves,
                                      f"{len(req.prompts)} prompts x {tree.num_leaves} leaves")
        prompt_ids = [await server.encode(p) for p in req.prompts]
        params = [server.sampling_params(req, len(ids), req.max_tokens, None) for ids in prompt_ids]
        # One seed per prompt (seed + i), so that prompts do not share noise; random per prompt without a seed.
        seeds = [req.seed + i if req.seed is not None else random.getrandbits(63) for i in range(len(prompt_ids))]
        for ids, p, seed in zip(prompt_ids, params, seeds):
            server.sequences(ids, replace(p, n=tree.trees), seed)  # validates before anything is queued
        run = TreeRun(llm, tree, params, Progress(server.engine, 0, "trees", False))
        return await server.run(request, lambda emit: TreeJob(run, prompt_ids, seeds, emit),
                                lambda results: tree_response(results, server.served_name, server.fmt))

    app.include_router(admin_router(server))
    return app


async def _generate(server: Server, request: Request, req: GenerationRequest, requests: Requests,
                    opts: Options) -> Response:
    stream = req.stream

    def make_job(emit: Emit) -> Job:
        return GenerateJob(requests, emit, stream, server.fmt.final_text)

    if stream:
        n = len(requests[0][1])
        return server.stream(make_job, StreamState(server.fmt, opts, [ids for ids, _ in requests], n))
    return await server.run(request, make_job, lambda result: server.fmt.response(result, opts))


def _lifespan(server: Server) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.loop.start()
        try:
            yield
        finally:
            server.loop.stop()

    return lifespan


def model_name(model: str) -> str:
    """The served model's name: the name given (a registry name or a path's last part)."""
    return Path(model).name if Path(model).exists() else model
