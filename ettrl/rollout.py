"""Rollouts through the engine: parallel sampling (n_votes per prompt) or ETMR entropy-fork trees."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ettrl.data import Problem
from ettrl.grading import BOXED_ANSWER_REGEX
from ettrl.samples import Group, Response

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from engine import LLM, CompletionOutput, SamplingParams, TreeParams
    from engine.tree import Leaf
    from ettrl.config import Config, EngineSection, RolloutConfig


def answer_stop(stop_at_answer: bool) -> dict[str, Any]:
    """SamplingParams fields that end a response with its first complete \\boxed{...}, kept in the text (the
    tokens up to the one that completes it train); {} when off (docs/algorithms.md section 1)."""
    return {"stop_regex": [BOXED_ANSWER_REGEX], "include_stop_str_in_output": True} if stop_at_answer else {}


def sampling_params(rcfg: RolloutConfig, stop: list[str], seed: int, n: int) -> SamplingParams:
    from engine import SamplingParams

    return SamplingParams(n=n, temperature=rcfg.temperature, top_p=rcfg.top_p, max_tokens=rcfg.max_tokens,
                          stop=stop, seed=seed, **answer_stop(rcfg.stop_at_answer))


def tree_params(rcfg: RolloutConfig) -> TreeParams:
    """ETMR's shape and where forks may go (docs/algorithms.md section 4)."""
    from engine import TreeParams

    return TreeParams(trees=rcfg.trees, forks=rcfg.forks, branches=rcfg.branches, metric=rcfg.fork_metric,
                      distinct=rcfg.distinct, no_fork_after=list(rcfg.no_fork_after), min_gap=rcfg.min_gap)


def rollout(llm: LLM, problems: list[Problem], prompt_ids: list[list[int]], cfg: Config, stop: list[str], seed: int,
            progress: bool = False) -> list[Group]:
    """One Group per problem; `decoded_tokens` is what the engine actually decoded for it. progress: a bar."""
    r = cfg.rollout
    seeds = [(seed + i) % 2**63 for i in range(len(prompt_ids))]  # each prompt its own noise
    if not cfg.tree:
        outs = llm.generate(prompt_ids, [sampling_params(r, stop, s, r.n_votes) for s in seeds], use_tqdm=progress)
        return [Group(p, ids, [_response(o) for o in out.outputs], sum(len(o.token_ids) for o in out.outputs))
                for p, ids, out in zip(problems, prompt_ids, outs)]
    trees = llm.sample_tree(prompt_ids, tree_params(r), [sampling_params(r, stop, s, 1) for s in seeds],
                            use_tqdm=progress)
    return [Group(p, ids, [_response(leaf, leaf.root) for leaf in t.leaves], t.stats.decoded_tokens)
            for p, ids, t in zip(problems, prompt_ids, trees)]


def _response(out: CompletionOutput | Leaf, tree: int | None = None) -> Response:
    assert out.finish_reason is not None, "a finished response has a finish reason"
    return Response(list(out.token_ids), out.text, [float(h) for h in out.entropies], out.finish_reason, tree)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def engine_dtype(dtype: str, device: str) -> str:
    """The trainer's engine dtype: "auto" is bfloat16 on CUDA (flashinfer's kernels, half the memory) and float32
    on the CPU (where the fp32 engine matches the fp32 trainer best)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def engine_options(engine: EngineSection, device: str) -> dict[str, Any]:
    """LLM(...) keyword arguments from a config's engine section (ettrl.config.EngineSection: every EngineConfig
    field but model). Its device "auto" is the run's `device`; its dtype "auto" as engine_dtype says."""
    from dataclasses import asdict

    options = asdict(engine)
    options["device"] = resolve_device(device if options["device"] == "auto" else options["device"])
    options["dtype"] = engine_dtype(options["dtype"], options["device"])
    return options


def make_llm(model: str, dtype: str = "auto", device: str = "auto",
             **engine_kwargs: Any) -> tuple[LLM, PreTrainedTokenizerBase]:
    """(engine, tokenizer) for a model spec or directory; the trainer loads its copy from the same directory.
    dtype "auto": bfloat16 on CUDA, float32 on the CPU (engine_dtype)."""
    from transformers import AutoTokenizer

    from engine import LLM
    from engine.model_files import resolve_model

    model_dir = resolve_model(model)
    device = resolve_device(device)
    llm = LLM(str(model_dir), dtype=engine_dtype(dtype, device), device=device, **engine_kwargs)
    return llm, AutoTokenizer.from_pretrained(str(model_dir))
