"""The engine as TRL's rollout backend: GRPOTrainer(rollout_func=make_rollout_func(llm_or_url, tree_params)).

TRL hands the rollout function its prompt slice with each prompt repeated num_generations times in a row and
expects one completion per row back: prompt_ids, completion_ids and per-token logprobs (of the distribution
sampled from: softmax(logits / T), as TRL's own forward computes them); every other key reaches the reward
functions. We add `entropies` (per token), `tree_origin` ((root, fork_position, branch), or None for parallel
samples) and `padding`.

Before it generates, the function pushes the trainer's weights into the engine whenever the trainer's global
step changed since the last push (in process: LLM.update_weights; a server: POST /update_weights_from_tensor,
which waits for requests in flight). With `tree_params`, one ETMR tree set per prompt gives the
num_generations completions; a tree that could not fork all its branches has fewer leaves, and the group is
filled as the ettrl trainer fills it (ettrl.update.pad_samples): zero-weight copies of the last leaf, marked
`padding=True`, whose tokens are masked out of the loss (`env_mask` all 0). Wrap reward functions in
`skip_padding` so that fillers get None, which TRL leaves out of the group's mean and std (advantage 0).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

import torch

from engine import LLM, SamplingParams, TreeParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from trl import GRPOConfig, GRPOTrainer

Prompt = str | list[dict[str, str]]  # a text prompt, or a conversation (chat messages)
Row = dict[str, Any]  # one completion: token_ids, logprobs, entropies; a tree leaf's origin; padding for fillers
RolloutFunc = Callable[[list[Prompt], "GRPOTrainer"], dict[str, list]]


def make_rollout_func(llm_or_url: LLM | str, tree_params: TreeParams | None = None, api_key: str | None = None,
                      timeout: float = 600.0) -> RolloutFunc:
    """llm_or_url: an engine `LLM` in this process, or the base URL of `python -m engine.serve` (started with
    --enable-weight-updates so that weights can be pushed). Returns rollout_func(prompts, trainer) -> dict."""
    backend: _Rollouts = (_InProcess(llm_or_url) if isinstance(llm_or_url, LLM)
                          else _Remote(str(llm_or_url), api_key, timeout))
    state: dict[str, Any] = {"pushed_step": None, "calls": 0}

    def rollout_func(prompts: list[Prompt], trainer: GRPOTrainer) -> dict[str, list]:
        step = trainer.state.global_step
        if state["pushed_step"] != step:
            backend.push_weights(trainer_weights(trainer))
            state["pushed_step"] = step
        state["calls"] += 1
        num_generations = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        groups = prompt_groups(prompts, num_generations)
        tokenizer = trainer.processing_class
        prompt_ids = [encode_prompt(tokenizer, prompt) for prompt, _ in groups]
        base = SamplingParams(**trainer_sampling(trainer.args))
        seeds = [random.Random(f"{trainer.args.seed}/{step}/{state['calls']}/{i}").getrandbits(63)
                 for i in range(len(groups))]
        if tree_params is None:
            rows = backend.generate(prompt_ids, [count for _, count in groups], base, seeds)
        else:
            rows = backend.trees(prompt_ids, [count for _, count in groups], tree_params, base, seeds)
        return as_trl_output(prompt_ids, rows)

    return rollout_func


def skip_padding(reward_func: Callable[..., list[float]]) -> Callable[..., Sequence[float | None]]:
    """A reward function that returns None for padding rows (TRL then leaves them out of the advantages)."""
    def wrapped(*args: Any, padding: list[bool] | None = None, **kwargs: Any) -> Sequence[float | None]:
        rewards = reward_func(*args, **kwargs)
        return [None if pad else r for r, pad in zip(rewards, padding)] if padding is not None else rewards
    wrapped.__name__ = getattr(reward_func, "__name__", "reward")
    return wrapped


# ---- the pieces ---------------------------------------------------------------------------------------------
def prompt_groups(prompts: list[Prompt], num_generations: int) -> list[tuple[Prompt, int]]:
    """(prompt, rows) per run of equal consecutive prompts, each run cut into groups of num_generations (a
    slice may start or end inside a group: its run is shorter)."""
    groups: list[list[Any]] = []
    for prompt in prompts:
        if groups and groups[-1][0] == prompt and groups[-1][1] < num_generations:
            groups[-1][1] += 1
        else:
            groups.append([prompt, 1])
    return [(p, n) for p, n in groups]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """A text prompt as the trainer's tokenizer encodes it; a conversation through its chat template."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def trainer_sampling(args: GRPOConfig) -> dict[str, Any]:
    """SamplingParams fields from GRPOConfig (top_k 0 or None: off; min_p and repetition penalties are not
    supported and refused rather than ignored)."""
    if getattr(args, "min_p", None) not in (None, 0.0) or getattr(args, "repetition_penalty", 1.0) != 1.0:
        raise ValueError("the engine samples without min_p and repetition_penalty; leave them at their defaults")
    top_k = getattr(args, "top_k", None)
    return {"temperature": args.temperature, "top_p": args.top_p if args.top_p is not None else 1.0,
            "top_k": top_k if top_k else -1, "max_tokens": args.max_completion_length or 256}


def trainer_weights(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    """The trained model's tensors by Hugging Face name (one name per storage: tied weights once)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    weights, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            weights[name] = tensor.detach()
    return weights


def fill(rows: list[Row], count: int) -> list[Row]:
    """Tree leaves of one prompt to exactly `count` rows: zero-weight copies of the last leaf (padding)."""
    if len(rows) > count:
        raise ValueError(f"a tree set gives {len(rows)} leaves but the trainer asks for {count} completions "
                         f"per prompt; set num_generations to TreeParams.num_leaves")
    return rows + [dict(rows[-1], padding=True)] * (count - len(rows))


def as_trl_output(prompt_ids: list[list[int]], groups: list[list[Row]]) -> dict[str, list]:
    keys = ("prompt_ids", "completion_ids", "logprobs", "entropies", "tree_origin", "padding", "env_mask")
    out: dict[str, list] = {k: [] for k in keys}
    for ids, rows in zip(prompt_ids, groups):
        for row in rows:
            out["prompt_ids"].append(list(ids))
            out["completion_ids"].append(row["token_ids"])
            out["logprobs"].append(row["logprobs"])
            out["entropies"].append(row["entropies"])
            out["tree_origin"].append(row.get("origin"))
            out["padding"].append(row.get("padding", False))
            out["env_mask"].append([0 if row.get("padding") else 1] * len(row["token_ids"]))
    return out


class _Rollouts(Protocol):
    """Where the completions come from: the engine in this process or a server."""

    def push_weights(self, weights: dict[str, torch.Tensor]) -> None: ...

    def generate(self, prompt_ids: list[list[int]], counts: list[int], base: SamplingParams,
                 seeds: list[int]) -> list[list[Row]]: ...

    def trees(self, prompt_ids: list[list[int]], counts: list[int], tree_params: TreeParams, base: SamplingParams,
              seeds: list[int]) -> list[list[Row]]: ...


class _InProcess:
    def __init__(self, llm: LLM) -> None:
        self.llm = llm

    def push_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.llm.update_weights(weights)

    def generate(self, prompt_ids: list[list[int]], counts: list[int], base: SamplingParams,
                 seeds: list[int]) -> list[list[Row]]:
        params = [SamplingParams(**{**vars(base), "n": n, "seed": s}) for n, s in zip(counts, seeds)]
        outs = self.llm.generate(prompt_ids, params)
        return [[{"token_ids": o.token_ids, "logprobs": o.logprobs, "entropies": o.entropies} for o in out.outputs]
                for out in outs]

    def trees(self, prompt_ids: list[list[int]], counts: list[int], tree_params: TreeParams, base: SamplingParams,
              seeds: list[int]) -> list[list[Row]]:
        params = [SamplingParams(**{**vars(base), "seed": s}) for s in seeds]
        results = self.llm.sample_tree(prompt_ids, tree_params, params)
        return [fill([{"token_ids": leaf.token_ids, "logprobs": leaf.logprobs, "entropies": leaf.entropies,
                       "origin": leaf.origin} for leaf in r.leaves], n) for r, n in zip(results, counts)]


class _Remote:
    """A server started with `python -m engine.serve --enable-weight-updates`."""

    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        import httpx
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def push_weights(self, weights: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save
        body = save({name: t.cpu().contiguous() for name, t in weights.items()})
        self._post("/update_weights_from_tensor?if_busy=wait", content=body,
                   headers={"Content-Type": "application/octet-stream"})

    def generate(self, prompt_ids: list[list[int]], counts: list[int], base: SamplingParams,
                 seeds: list[int]) -> list[list[Row]]:
        # one request per prompt: each its own seed, all in one continuous batch
        def one(ids: list[int], n: int, seed: int) -> list[Row]:
            body = {**_sampling_body(base), "prompt": ids, "n": n, "seed": seed, "return_token_ids": True,
                    "return_entropies": True, "logprobs": 0}
            choices = self._post("/v1/completions", json=body)["choices"]
            return [{"token_ids": c["token_ids"], "logprobs": c["logprobs"]["token_logprobs"],
                     "entropies": c["entropies"]} for c in choices]
        with ThreadPoolExecutor(max(1, min(64, len(prompt_ids)))) as pool:
            return list(pool.map(one, prompt_ids, counts, seeds))

    def trees(self, prompt_ids: list[list[int]], counts: list[int], tree_params: TreeParams, base: SamplingParams,
              seeds: list[int]) -> list[list[Row]]:
        def one(ids: list[int], n: int, seed: int) -> list[Row]:
            body = {**_sampling_body(base), "prompts": [ids], "seed": seed, **vars(tree_params)}
            leaves = self._post("/v1/sample_tree", json=body)["results"][0]["leaves"]
            return fill([{"token_ids": leaf["token_ids"], "logprobs": leaf["logprobs"],
                          "entropies": leaf["entropies"], "origin": tuple(leaf["origin"].values())}
                         for leaf in leaves], n)
        with ThreadPoolExecutor(max(1, min(64, len(prompt_ids)))) as pool:
            return list(pool.map(one, prompt_ids, counts, seeds))

    def _post(self, path: str, **kwargs: Any) -> dict[str, Any]:
        r = self.http.post(path, **kwargs)
        if r.status_code != 200:
            raise RuntimeError(f"POST {path} answered {r.status_code}: {r.text[:500]}")
        return r.json()


def _sampling_body(p: SamplingParams) -> dict[str, Any]:
    """The request fields of SamplingParams (what the server's routes take under the same names)."""
    return {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "max_tokens": p.max_tokens,
            "stop": p.stop, "stop_regex": p.stop_regex, "stop_token_ids": p.stop_token_ids,
            "include_stop_str_in_output": p.include_stop_str_in_output, "ignore_eos": p.ignore_eos}
