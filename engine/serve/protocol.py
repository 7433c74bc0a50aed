"""Request bodies of the HTTP API, named and shaped as OpenAI's / vLLM's / SGLang's, validated by pydantic.

Unknown fields are kept aside (pydantic extra="allow") so the server can ignore them with a warning, as vLLM
does, or refuse them with --reject-unknown-fields. OpenAI's and vLLM's sampling fields that the engine does not
implement are known here with their defaults and refused (400, naming the field) when a request sets another value.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 4096           # samples per prompt; above it a request is refused (it would only fill the queue)
MAX_LOGPROBS = 20      # alternatives per token, as OpenAI's limit
MAX_STOP = 16          # stop strings, and stop_regex patterns, per request (OpenAI allows 4 stop strings)
MAX_STOP_CHARS = 256   # characters of a stop string or pattern (the automaton is bounded: engine/stop_regex.py)
MAX_STOP_TOKEN_IDS = 256
INT64 = 2**63

StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]

# Sampling fields of OpenAI / vLLM the engine does not implement: their defaults (a request may send these).
NOT_IMPLEMENTED: dict[str, tuple] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
    "logit_bias": (None, {}), "min_p": (0, 0.0), "min_tokens": (0,), "length_penalty": (1, 1.0),
    "use_beam_search": (False,), "prompt_logprobs": (None,), "response_format": (None, {"type": "text"}),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "structured_outputs": (None,), "logits_processors": (None, []), "bad_words": (None, []),
    "skip_special_tokens": (True,), "truncate_prompt_tokens": (None,),
    "suffix": (None, ""),
}


class RequestBody(BaseModel):
    """Every request body: unknown fields kept aside (model_extra) for the server to ignore or refuse."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(RequestBody):
    """The sampling fields every generation route shares (SamplingParams' names)."""
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, lt=INT64)
    max_tokens: int | None = Field(None, ge=1)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    stop_regex: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None  # SGLang's
    include_stop_str_in_output: bool = False   # vLLM's: the text keeps the matched stop string / regex match
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    seed: int | None = Field(None, ge=0, lt=INT64)
    ignore_eos: bool = False
    best_of: int | None = None           # vLLM: only best_of = n (or none) is what the engine does
    # not implemented (NOT_IMPLEMENTED): accepted at their defaults only
    frequency_penalty: Any = 0.0
    presence_penalty: Any = 0.0
    repetition_penalty: Any = 1.0
    logit_bias: Any = None
    min_p: Any = 0.0
    min_tokens: Any = 0
    length_penalty: Any = 1.0
    use_beam_search: Any = False
    prompt_logprobs: Any = None
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    logits_processors: Any = None
    bad_words: Any = None
    skip_special_tokens: Any = True
    truncate_prompt_tokens: Any = None

    def not_implemented(self) -> list[str]:
        """The fields set to something the engine does not do."""
        fields = [name for name, defaults in NOT_IMPLEMENTED.items()
                  if name in type(self).model_fields and not _is_default(getattr(self, name), defaults)]
        if self.best_of not in (None, self.n):
            fields.append("best_of")
        return fields



def _is_default(value: object, defaults: tuple[Any, ...]) -> bool:
    return any(value == d and isinstance(value, bool) == isinstance(d, bool) for d in defaults)


class CompletionRequest(SamplingFields):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: Any = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False      # vLLM's name: prompt_token_ids and token_ids in every choice
    return_entropies: bool = False      # ours: the full-vocabulary entropy of each sampled token's distribution
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:N" (byte pieces stay apart)
    user: str | None = None


class TextPart(BaseModel):
    """OpenAI's content part of type text (the only kind a text model takes)."""
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None

    def flat(self) -> dict[str, Any]:
        """The message as a chat template takes it: content parts joined by newlines (vLLM's rule)."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "\n".join(part.text for part in self.content)
        return message


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
    metric: Literal["entropy", "surprisal"] = "surprisal"  # TreeParams.metric's default (a test keeps them equal)
    distinct: bool = False
    no_fork_after: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] = []
    min_gap: int = Field(1, ge=1, le=INT64 - 1)
    branch_after_all_roots: bool = False


GenerationRequest = CompletionRequest | ChatCompletionRequest  # the routes that answer in OpenAI's shapes


class UpdateWeightsFromDiskRequest(RequestBody):
    model_path: str
    weight_version: str | None = None   # SGLang's: a name for the new weights, reported beside the version counter
    if_busy: Literal["wait", "refuse"] = "wait"
