"""What one request may ask for, derived from the model and the KV pool, and checked before anything is
tokenized or built: the characters of a text prompt, the bytes of a body, the sequences of a request; and that
every string of a body is valid Unicode (JSON lets a lone surrogate through, a tokenizer does not)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.serve.config import ServerConfig
from engine.serve.errors import ApiError

JSON_BYTES_PER_CHAR = 6     # the most a character of the BMP takes in JSON text (escaped as \uXXXX)
BODY_SLACK_BYTES = 2**20    # the rest of a request besides its longest prompt

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedTokenizerBase

    from engine.llm import LLM


@dataclass(frozen=True)
class Limits:
    prompt_chars: int       # no longer text fits the model: max_model_len x the longest token's characters
    body_bytes: int         # JSON bodies: --max-body-mb, or one longest prompt (escaped) + BODY_SLACK_BYTES
    sequences: int          # --max-sequences-per-request, or the KV pool's number of blocks

    @classmethod
    def of(cls, llm: LLM, config: ServerConfig) -> Limits:
        prompt_chars = llm.engine.max_model_len * longest_token_chars(llm.tokenizer)
        body = (int(config.max_body_mb * 2**20) if config.max_body_mb is not None
                else prompt_chars * JSON_BYTES_PER_CHAR + BODY_SLACK_BYTES)
        return cls(prompt_chars, body, config.max_sequences_per_request or llm.engine.runner.num_kv_blocks)

    def check_sequences(self, count: int, what: str) -> None:
        if count > self.sequences:
            raise ApiError(400, f"this request asks for {count} sequences ({what}); the server takes at most "
                                f"{self.sequences} per request (--max-sequences-per-request): split it")

    def check_chars(self, chars: int, what: str = "the prompt") -> None:
        if chars > self.prompt_chars:
            raise ApiError(400, f"{what} has {chars} characters; no text longer than {self.prompt_chars} "
                                f"characters fits this model (max length x the longest token): shorten it")


def longest_token_chars(tokenizer: PreTrainedTokenizerBase | None) -> int:
    """Characters of the longest vocabulary entry, as the vocabulary writes it (a byte-level or SentencePiece
    entry is at least as long as the text it stands for)."""
    if tokenizer is None:
        return 1
    return max(map(len, tokenizer.get_vocab()), default=1)


def check_unicode(body: object) -> None:
    """400 for a string holding a lone surrogate (JSON's "\\ud800"), anywhere in the parsed body."""
    stack = [body]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ApiError(400, f"a string of the request holds {value[e.start:e.end]!r}, a lone UTF-16 "
                                    f"surrogate, which is not text: send valid Unicode") from None
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
