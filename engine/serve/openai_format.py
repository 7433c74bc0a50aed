"""Response JSON in OpenAI's / vLLM's shapes (docs/serving.md shows each one), built from finished sequences or
streamed deltas. Our extensions: `entropies` (return_entropies) and the token ids (return_token_ids, vLLM's)."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from engine.sequence import Sequence

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedTokenizerBase

    from engine.llm import LLM
    from engine.serve.jobs import Delta, Requests, TopLogprobs
    from engine.tree import TreeResult


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class Options:
    """What one request asked to see."""
    model: str
    kind: str                    # "completion" | "chat"
    logprobs: int | None         # alternatives per token; None: no logprobs object
    raw_logprobs: bool           # vLLM's raw_logprobs mode: token logprobs from softmax(logits)
    return_token_ids: bool
    return_entropies: bool
    include_usage: bool = False
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:N"
    id: str = field(default_factory=lambda: new_id("cmpl"))
    created: int = field(default_factory=lambda: int(time.time()))


class Formatter:
    """Token texts, logprobs objects and whole responses of one model (its tokenizer and its stop rules)."""

    def __init__(self, llm: LLM) -> None:
        self.llm, self.tokenizer = llm, llm.tokenizer

    # ---- text ------------------------------------------------------------------------------------------------
    def token_text(self, token: int, as_id: bool = False) -> str:
        if as_id or self.tokenizer is None:
            return f"token_id:{token}"
        return self.tokenizer.decode([token])

    def final_text(self, seq: Sequence) -> str:
        """A finished sample's text as LLM.generate gives it: cut at a stop match's start, or at its end with
        include_stop_str_in_output."""
        return self.llm._completion(seq).text or ""

    # ---- logprobs ----------------------------------------------------------------------------------------------
    def token_logprobs(self, logprobs: list[float], top: list[TopLogprobs], opts: Options) -> list[float]:
        return [t[0] for t in top] if opts.raw_logprobs else list(logprobs)

    @staticmethod
    def _top(logprobs: list[float], top: list[TopLogprobs]) -> list[TopLogprobs]:
        """No alternatives recorded (logprobs=0 in the sampler's own distribution): the sampled token's only."""
        return top if len(top) == len(logprobs) else [(lp, []) for lp in logprobs]

    def completion_logprobs(self, token_ids: list[int], logprobs: list[float], top: list[TopLogprobs], opts: Options,
                            offset: int = 0) -> dict[str, Any] | None:
        if opts.logprobs is None:
            return None
        top = self._top(logprobs, top)
        name = partial(self.token_text, as_id=opts.tokens_as_ids)
        tokens = [name(t) for t in token_ids]
        offsets, at = [], offset
        for s in tokens:
            offsets.append(at)
            at += len(s)
        alternatives = []
        for t, lp, (_, alts) in zip(tokens, self.token_logprobs(logprobs, top, opts), top):
            entry = {name(i): v for i, v in alts}
            entry.setdefault(t, lp)
            alternatives.append(entry)
        return {"text_offset": offsets, "token_logprobs": self.token_logprobs(logprobs, top, opts),
                "tokens": tokens, "top_logprobs": alternatives}

    def chat_logprobs(self, token_ids: list[int], logprobs: list[float], top: list[TopLogprobs],
                      opts: Options) -> dict[str, Any] | None:
        if opts.logprobs is None:
            return None
        top = self._top(logprobs, top)
        name = partial(self.token_text, as_id=opts.tokens_as_ids)
        content = []
        for token, lp, (_, alts) in zip(token_ids, self.token_logprobs(logprobs, top, opts), top):
            content.append({"token": name(token), "logprob": lp, "bytes": list(name(token).encode()),
                            "top_logprobs": [{"token": name(i), "logprob": v, "bytes": list(name(i).encode())}
                                             for i, v in alts]})
        return {"content": content}

    # ---- whole responses -----------------------------------------------------------------------------------------
    def response(self, requests: Requests, opts: Options) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        completion_tokens = 0
        for prompt_ids, seqs in requests:
            for seq in seqs:
                choices.append(self._choice(len(choices), prompt_ids, seq, opts))
                completion_tokens += seq.num_completion_tokens
        prompt_tokens = sum(len(ids) for ids, _ in requests)
        return {"id": opts.id, "object": "chat.completion" if opts.kind == "chat" else "text_completion",
                "created": opts.created, "model": opts.model, "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens)}

    def _choice(self, index: int, prompt_ids: list[int], seq: Sequence, opts: Options) -> dict[str, Any]:
        ids = seq.completion_token_ids
        text, stop_reason = self.final_text(seq), seq.stop_reason
        if opts.kind == "chat":
            choice: dict[str, Any] = {"index": index, "message": {"role": "assistant", "content": text},
                      "logprobs": self.chat_logprobs(ids, seq.logprobs, seq.top_logprobs, opts),
                      "finish_reason": seq.finish_reason, "stop_reason": stop_reason}
        else:
            choice = {"index": index, "text": text,
                      "logprobs": self.completion_logprobs(ids, seq.logprobs, seq.top_logprobs, opts),
                      "finish_reason": seq.finish_reason, "stop_reason": stop_reason}
        if opts.return_token_ids:
            choice["prompt_token_ids"], choice["token_ids"] = list(prompt_ids), list(ids)
        if opts.return_entropies:
            choice["entropies"] = list(seq.entropies)
        return choice


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class IncrementalText:
    """A sample's text as its tokens arrive, each chunk decoding only its newest few tokens (vLLM's prefix / read
    offsets; a token that is part of a multi-byte character waits for the rest), so a long stream costs the event
    loop what a short one does per token."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.tokenizer, self.text = tokenizer, ""
        self.ids: list[int] = []
        self.prefix = self.read = 0  # token indices

    def extend(self, token_ids: list[int]) -> str:
        self.ids += token_ids
        if self.tokenizer is None:
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self.text

    def _decode(self, ids: list[int]) -> str:
        assert self.tokenizer is not None  # extend() decodes only with a tokenizer
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class StreamState:
    """Server-sent events of one streaming request: one chunk per sample and step that produced something."""

    def __init__(self, formatter: Formatter, opts: Options, prompt_ids: list[list[int]], n: int) -> None:
        self.fmt, self.opts = formatter, opts
        self.prompt_of = [ids for ids in prompt_ids for _ in range(n)]
        self.texts = [IncrementalText(formatter.tokenizer) for _ in self.prompt_of]
        self.text_sent = [0] * len(self.prompt_of)
        self.started = [False] * len(self.prompt_of)
        self.offset = [0] * len(self.prompt_of)   # text_offset of the next token (logprobs)
        self.prompt_tokens = sum(len(ids) for ids in prompt_ids)

    def chunks(self, deltas: list[Delta]) -> list[str]:
        return [self._chunk(d) for d in deltas]

    def _chunk(self, d: Delta) -> str:
        k, opts = d.index, self.opts
        text = self.texts[k].extend(d.token_ids)
        if d.text is not None:
            text = d.text
        elif d.final_length is not None:  # the rest may still be cut by a stop match
            text = text[:d.final_length]
        new_text, self.text_sent[k] = text[self.text_sent[k]:], max(self.text_sent[k], len(text))
        if opts.kind == "chat":
            delta: dict[str, str] = {"content": new_text}
            if not self.started[k]:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": k, "delta": delta,
                      "logprobs": self.fmt.chat_logprobs(d.token_ids, d.logprobs, d.top_logprobs, opts)}
        else:
            logprobs = self.fmt.completion_logprobs(d.token_ids, d.logprobs, d.top_logprobs, opts, self.offset[k])
            if logprobs is not None:
                self.offset[k] += sum(map(len, logprobs["tokens"]))
            choice = {"index": k, "text": new_text, "logprobs": logprobs}
        choice["finish_reason"], choice["stop_reason"] = d.finish_reason, d.stop_reason
        if opts.return_token_ids:
            if not self.started[k]:
                choice["prompt_token_ids"] = list(self.prompt_of[k])
            choice["token_ids"] = list(d.token_ids)
        if opts.return_entropies:
            choice["entropies"] = list(d.entropies)
        self.started[k] = True
        return sse(self._envelope([choice]))

    def usage_chunk(self) -> str | None:
        if not self.opts.include_usage:
            return None
        body = self._envelope([])
        body["usage"] = usage(self.prompt_tokens, sum(len(t.ids) for t in self.texts))
        return sse(body)

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.opts.kind == "chat" else "text_completion"
        return {"id": self.opts.id, "object": kind, "created": self.opts.created, "model": self.opts.model,
                "choices": choices}


def sse(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


def tree_response(results: list[TreeResult], model: str, formatter: Formatter) -> dict[str, Any]:
    """POST /v1/sample_tree: per prompt, every leaf with its origin, and the tree's stats."""
    out, prompt_tokens, decoded = [], 0, 0
    for i, r in enumerate(results):
        leaves = [{"index": k, "text": leaf.text, "token_ids": leaf.token_ids, "logprobs": leaf.logprobs,
                   "entropies": leaf.entropies, "finish_reason": leaf.finish_reason,
                   "stop_reason": leaf.stop_reason, "seq_id": leaf.seq_id,
                   "origin": {"root": leaf.root, "fork_position": leaf.fork_position, "branch": leaf.branch}}
                  for k, leaf in enumerate(r.leaves)]
        s = r.stats
        stats = {"leaves": s.leaves, "decoded_tokens": s.decoded_tokens, "reused_tokens": s.reused_tokens,
                 "parallel_equivalent_tokens": s.parallel_equivalent_tokens, "token_ratio": s.token_ratio,
                 "wall_seconds": s.wall_seconds}
        out.append({"index": i, "prompt_token_ids": r.prompt_token_ids, "seed": r.seed,
                    "fork_positions": r.fork_positions, "leaves": leaves, "stats": stats})
        prompt_tokens += len(r.prompt_token_ids)
        decoded += s.decoded_tokens
    return {"id": new_id("tree"), "object": "sample_tree", "created": int(time.time()), "model": model,
            "results": out, "usage": usage(prompt_tokens, decoded)}
