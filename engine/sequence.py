"""One sampled sequence: its tokens, its KV blocks and its per-token statistics."""
from __future__ import annotations

from enum import Enum, auto
from itertools import count
from typing import TYPE_CHECKING, cast

from engine.sampling_params import SamplingParams
from engine.stop_checker import TextStop

if TYPE_CHECKING:  # annotations only: engine.llm imports this module
    from engine.llm import Prompt, Prompts


class SequenceStatus(Enum):
    WAITING = auto()   # no KV blocks; the next step that schedules it is a prefill
    RUNNING = auto()   # holds KV blocks for tokens[:num_cached_tokens]; prefills the rest, then decodes
    FINISHED = auto()  # keeps its blocks until free() so that it can still be forked


class Sequence:
    """Noise key: (seed, seq_id, position). num_cached_tokens counts the tokens whose KV is in block_table."""
    _uids = count()

    def __init__(self, token_ids: list[int], params: SamplingParams, seed: int, seq_id: int = 0,
                 num_prompt_tokens: int | None = None):
        self.uid = next(Sequence._uids)
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids) if num_prompt_tokens is None else num_prompt_tokens
        self.params = params
        self.seed = seed
        self.seq_id = seq_id
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.num_scheduled_tokens = 0  # tokens the current step computes (the scheduler sets it)
        self.cache_node = None         # radix-tree node locked while this sequence uses the matched prefix
        self.logprobs: list[float] = []
        self.entropies: list[float] = []
        self.top_logprobs: list[tuple[float, list[tuple[int, float]]]] = []  # params.logprobs set: per token,
                                       # (its logprob, [(id, logprob)] of the top alternatives), in logprobs_mode
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None  # the matched stop text or stop token id (vLLM's meaning)
        self.text_stop: TextStop | None = None     # stop strings / stop_regex: the text so far and its matcher
        self.exclude_token = -1        # forbidden at the next sampled token only (distinct forks)
        self.pending_siblings: list["Sequence"] = []  # n>1: siblings that start from this one's prefill logits
        self.request_id = None
        self.parent_uid: int | None = None
        self.fork_position: int | None = None
        self.fork_depth = 0            # forks of forks count up; with a full batch, lower depths decode first

    def __len__(self):
        return len(self.token_ids)

    def __repr__(self):
        return (f"Sequence(uid={self.uid}, seq_id={self.seq_id}, len={len(self)}, "
                f"prompt={self.num_prompt_tokens}, status={self.status.name})")

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_prefilling(self) -> bool:
        """Admitted with more than its last token still to compute (a prompt, or recomputation after preemption)."""
        return self.status == SequenceStatus.RUNNING and self.num_cached_tokens < len(self.token_ids) - 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append(self, token: int, logprob: float, entropy: float) -> None:
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        self.entropies.append(entropy)


def per_prompt(prompts: Prompts, sampling_params: SamplingParams | list[SamplingParams]
               ) -> tuple[list[Prompt], list[SamplingParams]]:
    """(list of prompts, one SamplingParams per prompt): one str or id list becomes a list of one, and one
    SamplingParams serves every prompt."""
    one = isinstance(prompts, str) or bool(prompts) and isinstance(prompts[0], int)
    prompt_list = cast("list[Prompt]", [prompts] if one else prompts)
    params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompt_list)
    if len(params) != len(prompt_list):
        raise ValueError(f"{len(prompt_list)} prompts but {len(params)} SamplingParams")
    return prompt_list, params
