"""Evaluation: greedy pass@1, avg@k (T=0.6, top-p 0.95), maj@k and unbiased pass@k on any problem set.

    python -m ettrl.eval --model smollm2-135m-instruct --data arithmetic
    python -m ettrl.eval --model runs/x/checkpoints/step-000020 --data aime.jsonl --k 16 --max-tokens 3072
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from ettrl.data import Problem
from ettrl.grading import extract_answer, is_equivalent, ttrl_answer
from ettrl.metrics import avg_at_k, maj_at_k, pass_at_k
from ettrl.rewards import true_rewards, ttrl_vote
from ettrl.rollout import answer_stop

if TYPE_CHECKING:
    from engine import LLM, CompletionOutput
    from ettrl.config import EvalConfig


def evaluate(llm: LLM, problems: list[Problem], prompt_ids: list[list[int]], ecfg: EvalConfig, stop: list[str],
             seed: int = 0, desc: str = "eval", stop_at_answer: bool = False, vote: str = "boxed") -> dict[str, float]:
    """Accuracy metrics over the problems that have a ground-truth answer; tokens count every response.

    stop_at_answer ends each response at its first complete \\boxed{...}; vote=ttrl grades TTRL's answer
    string of every response (truncated ones too) instead of the last box (docs/algorithms.md section 7)."""
    from engine import SamplingParams

    labeled = [(p.answer, ids) for p, ids in zip(problems, prompt_ids) if p.answer is not None]
    if not labeled:
        raise ValueError("evaluation needs ground-truth answers; the eval data has none (check data.answer_field)")
    k = ecfg.k
    answer_of, majority_correct = (_ttrl_answer, _ttrl_maj) if vote == "ttrl" else (_answer, maj_at_k)
    sampled = SamplingParams(n=k, temperature=ecfg.temperature, top_p=ecfg.top_p, max_tokens=ecfg.max_tokens,
                             stop=stop, seed=seed, **answer_stop(stop_at_answer))
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=ecfg.max_tokens, stop=stop, **answer_stop(stop_at_answer))
    chunk = max(1, 256 // k)
    sums = {"greedy": 0.0, f"avg@{k}": 0.0, f"maj@{k}": 0.0, f"pass@{k}": 0.0}
    tokens, start = 0, time.perf_counter()
    bar = tqdm(total=len(labeled), desc=desc, unit="problem", leave=False, file=sys.stdout)
    for i in range(0, len(labeled), chunk):
        part = labeled[i : i + chunk]
        ids = [x[1] for x in part]
        outs = llm.generate(ids, sampled)
        greedy_outs = llm.generate(ids, greedy) if ecfg.greedy else [None] * len(part)
        for (truth, _), out, g in zip(part, outs, greedy_outs):
            answers = [answer_of(o) for o in out.outputs]
            correct = true_rewards(answers, truth)
            sums[f"avg@{k}"] += avg_at_k(correct)
            sums[f"maj@{k}"] += majority_correct(answers, truth)
            sums[f"pass@{k}"] += pass_at_k(k, int(sum(correct)), k)
            tokens += sum(len(o.token_ids) for o in out.outputs)
            if g is not None:
                sums["greedy"] += true_rewards([answer_of(g.outputs[0])], truth)[0]
                tokens += len(g.outputs[0].token_ids)
        bar.update(len(part))
    bar.close()
    n = len(labeled)
    result = {name: value / n for name, value in sums.items() if name != "greedy" or ecfg.greedy}
    return {**result, "eval_problems": n, "eval_tokens": tokens, "eval_seconds": time.perf_counter() - start}


def _answer(out: CompletionOutput) -> str | None:
    return None if out.finish_reason == "length" else extract_answer(out.text)


def _ttrl_answer(out: CompletionOutput) -> str:
    return ttrl_answer(out.text or "")


def _ttrl_maj(answers: list[str | None], truth: str) -> bool:
    """maj@k under TTRL's vote: the most common answer string (qwen_eval.majority_vote in PRIME-RL/TTRL)."""
    return is_equivalent(ttrl_vote(answers).label, truth)


def main(argv: list[str] | None = None) -> dict:
    from ettrl.config import EvalConfig
    from ettrl.data import DataError, load_problems
    from ettrl.prompts import encode_prompts, stop_strings
    from ettrl.rollout import make_llm

    ap = argparse.ArgumentParser(prog="python -m ettrl.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True,
                    help="model spec (e.g. smollm2-135m-instruct), HF directory or checkpoint")
    ap.add_argument("--data", required=True, help="'arithmetic', a .jsonl/.json/.parquet file or a HF dataset name")
    ap.add_argument("--split", default="test")
    ap.add_argument("--problem-field", default="problem")
    ap.add_argument("--answer-field", default="answer")
    ap.add_argument("--limit", type=int, default=0, help="first N problems (0 = all; arithmetic: 64)")
    ap.add_argument("--difficulty", type=int, default=1, help="arithmetic task level")
    ap.add_argument("--prompt", default="fewshot", choices=["fewshot", "plain", "chat"])
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-greedy", action="store_true")
    ap.add_argument("--stop-at-answer", action="store_true", help="end each response at its first complete \\boxed{}")
    ap.add_argument("--vote", default="boxed", choices=["boxed", "ttrl"],
                    help="answers: the last box (boxed) or TTRL's answer string of every response (ttrl)")
    ap.add_argument("--dtype", default="auto", help="the engine's; auto: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the metrics to this JSON file")
    args = ap.parse_args(argv)

    size = args.limit or (64 if args.data == "arithmetic" else 0)
    try:
        problems = load_problems(args.data, split=args.split, problem_field=args.problem_field,
                                 answer_field=args.answer_field, size=size, difficulty=args.difficulty, seed=args.seed,
                                 key="--data")
    except DataError as e:
        raise SystemExit(f"error: {str(e).replace('data.problem_field', '--problem-field')}")
    llm, tokenizer = make_llm(args.model, args.dtype, args.device)
    ecfg = EvalConfig(k=args.k, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                      greedy=not args.no_greedy)
    result = evaluate(llm, problems, encode_prompts(tokenizer, problems, args.prompt), ecfg, stop_strings(args.prompt),
                      args.seed, stop_at_answer=args.stop_at_answer, vote=args.vote)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
