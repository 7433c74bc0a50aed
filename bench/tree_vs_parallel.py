"""ETMR tree sampling vs parallel sampling of the same number of leaves, on the same model and prompts.

For each (N, B): M(1 + B N) leaves per prompt from `LLM.sample_tree` against n = M(1 + B N) samples per
prompt from `LLM.generate`. Reports the decoded-token ratio (engine counters of both runs), the same ratio
within the tree's own leaves, the paper's theory (1 + 0.5 B N) / (1 + B N) (forks uniform over the response: mean
depth 0.5) and the same theory at the measured mean fork depth d, (1 + B N (1 - d)) / (1 + B N), the wall-clock
ratio, leaves/s, distinct answers per prompt, and how often the two majority votes agree. Medians of --repeats runs.

Both runs are timed with a full decode batch (prompts * trees >= --max-num-seqs), the regime of test-time RL
with many prompts: there wall-clock follows tokens. With a batch that is never full, wall-clock follows the
number of steps instead, and a tree needs root + branch steps in sequence.

    python bench/tree_vs_parallel.py            # SmolLM2-135M, 8 prompts, M=12, (N,B) = (2,2), (3,2), batch 64
    python bench/tree_vs_parallel.py --quick    # 1 prompt, one run, (2,2) only, batch 8
    python bench/tree_vs_parallel.py --data ../shared/data/math500.jsonl --prompt chat --max-tokens 192
                                                # long free-form answers, where forks spread over the response
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

from engine import LLM, SamplingParams, TreeParams
from ettrl.data import load_problems
from ettrl.grading import extract_answer, is_equivalent
from ettrl.prompts import build_prompt, stop_strings
from ettrl.rewards import majority_vote


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--data", default="arithmetic", help="arithmetic (built-in, level 1) or a JSONL/JSON/Parquet file")
    p.add_argument("--prompt", default="fewshot", choices=["fewshot", "plain", "chat"],
                   help="prompt style (ettrl.prompts)")
    p.add_argument("--trees", type=int, default=12)
    p.add_argument("--configs", default="2x2,3x2", help="comma-separated NxB fork/branch settings")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--metric", default="surprisal", choices=["surprisal", "entropy"])
    p.add_argument("--distinct", action="store_true")
    p.add_argument("--max-num-seqs", type=int, default=64,
                   help="engine decode batch; keep it <= prompts * trees so both runs keep the batch full")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--quick", action="store_true", help="1 prompt, one run, 2x2 only, batch 8, 48 tokens")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.repeats, args.configs, args.max_num_seqs, args.max_tokens = 1, 1, "2x2", 8, 48
    args.configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    return args


def timed(llm, fn):
    """(result, seconds, prefilled tokens, engine steps) of one call, from the engine's counters."""
    engine = llm.engine
    prefilled, steps = engine.num_prefill_tokens, engine.num_steps
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start, engine.num_prefill_tokens - prefilled, engine.num_steps - steps


def answers_of(texts: list[str]) -> list[str | None]:
    return [extract_answer(t) for t in texts]


def distinct_answers(answers: list[str | None]) -> int:
    vote = majority_vote(answers)
    return len({c for c in vote.class_ids if c >= 0})


def token_theory(forks: int, branches: int, depth: float = 0.5) -> float:
    """Tokens decoded relative to parallel sampling when every fork sits at `depth` of its root's length and each
    leaf is as long as its root: (1 + B N (1 - depth)) / (1 + B N); depth 0.5 is the paper's uniform forks."""
    return (1 + branches * forks * (1 - depth)) / (1 + branches * forks)


def mean_fork_depth(trees) -> float:
    """Mean fork position as a fraction of its root's length; the paper's theory assumes 0.5 (uniform forks)."""
    depths = [t / len(leaf.token_ids) for tree in trees for leaf in tree.leaves if leaf.fork_position is None
              for t in tree.fork_positions[leaf.root]]
    return statistics.mean(depths) if depths else float("nan")


def run_once(llm, prompts, tp: TreeParams, sp: SamplingParams) -> dict:
    n = tp.num_leaves
    trees, tree_s, tree_prefill, tree_steps = timed(llm, lambda: llm.sample_tree(prompts, tp, sp))
    parallel, par_s, par_prefill, par_steps = timed(llm, lambda: llm.generate(prompts, replace(sp, n=n)))
    tree_tokens = sum(t.stats.decoded_tokens for t in trees)
    par_tokens = sum(len(o.token_ids) for request in parallel for o in request.outputs)
    tree_answers = [answers_of([leaf.text for leaf in t.leaves]) for t in trees]
    par_answers = [answers_of([o.text for o in request.outputs]) for request in parallel]
    tree_labels = [majority_vote(a).label for a in tree_answers]
    par_labels = [majority_vote(a).label for a in par_answers]
    tree_leaves = sum(t.stats.leaves for t in trees)
    return {
        "token_ratio": tree_tokens / par_tokens,
        "leaf_token_ratio": (sum(t.stats.decoded_tokens for t in trees)
                             / sum(t.stats.parallel_equivalent_tokens for t in trees)),
        "fork_depth": mean_fork_depth(trees),
        "wall_ratio": tree_s / par_s,
        "step_ratio": tree_steps / par_steps,
        "tree_leaves_per_s": tree_leaves / tree_s,
        "parallel_leaves_per_s": n * len(prompts) / par_s,
        "tree_leaves": tree_leaves,
        "tree_decoded": tree_tokens,
        "parallel_decoded": par_tokens,
        "tree_prefilled": tree_prefill,
        "parallel_prefilled": par_prefill,
        "tree_s": tree_s,
        "parallel_s": par_s,
        "tree_distinct": statistics.mean(map(distinct_answers, tree_answers)),
        "parallel_distinct": statistics.mean(map(distinct_answers, par_answers)),
        "majority_agreement": statistics.mean(
            float((a is None and b is None) or is_equivalent(a, b)) for a, b in zip(tree_labels, par_labels)),
    }


def main():
    args = parse_args()
    problems = load_problems(args.data, split="eval", size=args.prompts, seed=args.seed, key="--data")
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs)
    prompts = [build_prompt(p.text, args.prompt, llm.tokenizer) for p in problems]
    llm.generate(prompts, SamplingParams(max_tokens=1))  # warm-up: every timed run finds the prompts cached
    rows = []
    for forks, branches in args.configs:
        tp = TreeParams(trees=args.trees, forks=forks, branches=branches, metric=args.metric, distinct=args.distinct)
        runs = []
        for rep in range(args.repeats):
            sp = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                                stop=stop_strings(args.prompt), seed=args.seed * 1000 + rep)
            runs.append(run_once(llm, prompts, tp, sp))
            print(f"N={forks} B={branches} run {rep}: " + ", ".join(f"{k}={v:.3g}" for k, v in runs[-1].items()),
                  flush=True)
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        at_depth = token_theory(forks, branches, median["fork_depth"])
        rows.append({"M": args.trees, "N": forks, "B": branches, "leaves": tp.num_leaves,
                     "theory": token_theory(forks, branches), "theory_at_depth": at_depth, **median})
    print_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "rows": rows}, f, indent=2)


def print_table(rows, args):
    print(f"\n{args.model} ({args.dtype}), {args.prompts} prompts of {args.data} ({args.prompt}), "
          f"T={args.temperature}, max {args.max_tokens} tokens, "
          f"batch {args.max_num_seqs}, fork metric {args.metric}{' distinct' if args.distinct else ''}, "
          f"median of {args.repeats}")
    print("| M | N | B | leaves/prompt | theory tokens | tokens tree/parallel | tokens within leaves | fork depth | "
          "theory at that depth | wall tree/parallel | steps tree/parallel | leaves/s tree | leaves/s parallel | "
          "distinct answers tree / parallel | majority agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['M']} | {r['N']} | {r['B']} | {r['leaves']} | {r['theory']:.3f} | {r['token_ratio']:.3f} | "
              f"{r['leaf_token_ratio']:.3f} | {r['fork_depth']:.2f} | {r['theory_at_depth']:.3f} | "
              f"{r['wall_ratio']:.3f} | {r['step_ratio']:.3f} | {r['tree_leaves_per_s']:.2f} | "
              f"{r['parallel_leaves_per_s']:.2f} | {r['tree_distinct']:.1f} / {r['parallel_distinct']:.1f} | "
              f"{r['majority_agreement']:.2f} |")


if __name__ == "__main__":
    main()
