"""Request bodies of the HTTP API, named and shaped as OpenAI's / vLLM's / SGLang's, validated by pydantic.

Unknown fields are kept aside (pydantic extra="allow") so the server can ignore them with a warning, as vLLM
does, or refuse them with --reject-unknown-fields.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 4096           # samples per prompt; above it a request is refused (it would only fill the queue)
MAX_LOGPROBS = 20      # alternatives per token, as OpenAI's limit


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(_Request):
    """The sampling fields every generation route shares (SamplingParams' names)."""
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    ignore_eos: bool = False


class CompletionRequest(SamplingFields):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False      # vLLM's name: prompt_token_ids and token_ids in every choice
    return_entropies: bool = False      # ours: the full-vocabulary entropy of each sampled token's distribution
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:N" (byte pieces stay apart)
    user: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None


class ChatCompletionRequest(SamplingFields):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    return_entropies: bool = False
    return_tokens_as_token_ids: bool = False
    user: str | None = None


class SampleTreeRequest(SamplingFields):
    """Prompts + TreeParams fields + sampling fields (n stays 1: trees x (1 + forks x branches) leaves per prompt)."""
    model: str | None = None
    prompts: list[str | list[int]] = Field(min_length=1)
    trees: int = Field(12, ge=1, le=MAX_N)
    forks: int = Field(2, ge=0, le=1024)
    branches: int = Field(2, ge=0, le=1024)
    metric: Literal["entropy", "surprisal"] = "entropy"
    distinct: bool = False


class UpdateWeightsFromDiskRequest(_Request):
    model_path: str
    weight_version: str | None = None   # SGLang's: the version to report after the update (default: count + 1)
    if_busy: Literal["wait", "refuse"] = "wait"
