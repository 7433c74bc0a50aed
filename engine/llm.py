"""User-facing API: LLM(model).generate(prompts, SamplingParams(...)) -> list[RequestOutput]."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_files import resolve_model
from engine.models.loader import NamedTensors
from engine.progress import Progress
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, SequenceStatus, per_prompt
from engine.tree import RootSelector, TreeParams, TreeResult, sample_tree

if TYPE_CHECKING:  # quoted where used, so that LLM's signatures hold real types at run time
    from transformers import PreTrainedTokenizerBase

Prompt = str | list[int]                                          # a text, or its token ids
Prompts = Prompt | list[str] | list[list[int]] | list[Prompt]     # one prompt, or a list of them
Conversation = list[dict[str, Any]]                               # chat messages: {"role", "content"}


@dataclass
class CompletionOutput:
    index: int                  # sample j of the request (its noise key is (seed, j))
    token_ids: list[int]
    text: str | None            # None when the model has no tokenizer
    logprobs: list[float]       # log p(token_t) under softmax(logits / T) (T = 1 for greedy)
    entropies: list[float]      # full-vocabulary entropy of that same distribution
    finish_reason: str          # "stop" (EOS, stop token, stop string or stop_regex) | "length"
    seed: int
    stop_reason: str | int | None = None  # the stop string or regex match that ended it, or the stop token id;
                                          # None for EOS and "length" (vLLM's meaning)


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


def _load_tokenizer(model_dir: Path) -> "PreTrainedTokenizerBase | None":
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


def _eos_token_ids(model_dir: Path, tokenizer: "PreTrainedTokenizerBase | None") -> set[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        eos = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
        ids.update([eos] if isinstance(eos, int) else eos or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class LLM:
    """LLM(model, dtype="bfloat16", device="auto", block_size=16, num_kv_blocks | kv_cache_tokens |
    kv_cache_memory_gb | gpu_memory_utilization, max_num_seqs=256, max_num_batched_tokens (256 CPU, 8192 CUDA),
    enable_chunked_prefill, long_prefill_token_threshold, max_model_len, enable_prefix_caching, ...: every field of
    engine.config.EngineConfig). device "auto" is cuda where torch sees a GPU, else cpu."""

    def __init__(self, model: str | Path, dtype: str = "bfloat16", device: str = "auto", **options: Any) -> None:
        self.config = EngineConfig(model=str(model), dtype=dtype, device=device, **options)
        self.model_dir = Path(resolve_model(model))
        self.tokenizer = _load_tokenizer(self.model_dir)
        self.engine = LLMEngine(self.config, self.model_dir, self.tokenizer,
                                _eos_token_ids(self.model_dir, self.tokenizer))
        self._next_request_id = 0

    def generate(self, prompts: Prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """prompts: list of str or of token-id lists (one str or id list is accepted too).
        use_tqdm: a progress bar over finished responses with the decode rate."""
        prompt_list, params = per_prompt(prompts, sampling_params or SamplingParams())
        requests = []  # (prompt text, prompt ids, sequences); all validated before any is queued
        for prompt, p in zip(prompt_list, params):
            ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
            requests.append((prompt if isinstance(prompt, str) else None, ids, self.engine.make_sequences(ids, p)))
        progress = Progress(self.engine, sum(len(seqs) for *_, seqs in requests), "generate", use_tqdm)
        try:
            for _, _, seqs in requests:
                self.engine.add_sequence(seqs[0])
            while self.engine.has_unfinished():
                finished = self.engine.step()
                for seq in finished:
                    self.engine.free(seq)
                progress.update(len(finished))
        finally:  # after an error (or KeyboardInterrupt) leave no live sequence behind
            progress.close()
            for _, _, seqs in requests:
                for seq in seqs:
                    if seq.block_table or seq.status != SequenceStatus.FINISHED:
                        self.engine.free(seq)
        return [self._request_output(text, ids, seqs) for text, ids, seqs in requests]

    def chat(self, conversations: Conversation | list[Conversation],
             sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """conversations: one list of {"role", "content"} messages, or a list of them."""
        one = bool(conversations) and isinstance(conversations[0], dict)  # a list of messages, not of conversations
        batch = [cast(Conversation, conversations)] if one else cast(list[Conversation], conversations)
        prompts = [self.apply_chat_template(c) for c in batch]
        return self.generate(prompts, sampling_params)

    def apply_chat_template(self, messages: Conversation) -> str:
        return self._need_tokenizer("chat").apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def sample_tree(self, prompts: Prompts, tree_params: TreeParams,
                    sampling_params: SamplingParams | list[SamplingParams], use_tqdm: bool = False,
                    select_roots: RootSelector | None = None) -> list[TreeResult]:
        """ETMR tree rollouts (engine/tree.py): M roots per prompt, B branches at each of N fork points.
        sampling_params: one for all prompts or one per prompt (each its own seed). use_tqdm: a progress bar.
        select_roots(i, root_leaves) -> roots to fork: called once per prompt when its M roots have finished."""
        return sample_tree(self, prompts, tree_params, sampling_params, use_tqdm=use_tqdm, select_roots=select_roots)

    def update_weights(self, named_tensors: NamedTensors) -> int:
        """Copies HF-named tensors (a state dict or (name, tensor) pairs) into the model in place, then empties
        the prefix cache. Refused while sequences are live; an unknown name (KeyError), a wrong shape, a dtype that
        is not floating-point or a NaN / infinite value (ValueError) refuses the whole update before anything is
        written. Returns the number of tensors written."""
        return self.engine.update_weights(named_tensors)

    def sleep(self, level: int = 1) -> None:
        """Gives the memory back between rollouts, as vLLM's sleep mode does around a trainer's update.
        level 1 frees the KV pool (and so the prefix cache); level 2 also moves the weights to CPU memory (on a
        GPU; on the CPU they stay). Unlike vLLM, level 1 keeps the weights where they are. Refused while requests
        are in flight. generate() raises until wake_up(); update_weights() works while asleep."""
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Brings back what sleep() gave back, with vLLM's tags: ["weights"] moves offloaded weights back to the
        device, ["kv_cache"] re-creates the KV pool (same size, empty prefix cache), None does both (weights
        first). Each checks the device's free memory first and raises DeviceMemoryError, staying asleep, when it
        does not fit (e.g. an optimizer's state now holds it)."""
        self.engine.wake_up(tags)

    def check_integrity(self) -> None:
        self.engine.check_integrity()

    def encode(self, prompt: str) -> list[int]:
        """Prompt text -> token ids (adds BOS unless the text already starts with it)."""
        tokenizer = self._need_tokenizer("text prompts")
        bos = tokenizer.bos_token
        add_special = not (bos and prompt.startswith(bos))  # chat-templated text already has its BOS
        return tokenizer.encode(prompt, add_special_tokens=add_special)

    def decode(self, token_ids: list[int]) -> str:
        return self._need_tokenizer("decoding").decode(token_ids, skip_special_tokens=True)

    def _need_tokenizer(self, what: str) -> "PreTrainedTokenizerBase":
        if self.tokenizer is None:
            raise ValueError(f"{what} need a tokenizer and {self.model_dir} has none; pass token-id lists")
        return self.tokenizer

    def _request_output(self, prompt: str | None, prompt_ids: list[int], seqs: list[Sequence]) -> RequestOutput:
        request_id, self._next_request_id = self._next_request_id, self._next_request_id + 1
        return RequestOutput(request_id, prompt, prompt_ids, [self._completion(s) for s in seqs])

    def _completion(self, seq: Sequence) -> CompletionOutput:
        """The text is cut at a stop match's start, or its end with include_stop_str_in_output; the tokens keep
        every sampled token (the one completing the match last)."""
        assert seq.finish_reason is not None, f"{seq} has not finished"
        text = None
        if seq.text_stop is not None and seq.text_stop.span is not None:
            text = seq.text_stop.output_text(seq.params.include_stop_str_in_output)
        elif self.tokenizer is not None:
            text = self.decode(seq.completion_token_ids)
        return CompletionOutput(seq.seq_id, seq.completion_token_ids, text, seq.logprobs, seq.entropies,
                                seq.finish_reason, seq.seed, seq.stop_reason)
