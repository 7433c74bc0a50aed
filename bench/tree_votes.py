"""How good are the pseudo-labels of a rollout shape? Majority-vote accuracy vs tokens, before any training.

Test-time RL only climbs if the majority answer is right more often than a single sample. This measures, on
problems with known answers, for parallel sampling (`n:16`) and ETMR trees (`tree:M,N,B`), with the trainer's
own prompts, sampling settings and answer grading:

    label_acc   how often the majority answer is correct (the TTRL pseudo-label)
    sample_acc  how often one response is correct (avg@k of the shape's leaves)
    tokens      tokens the engine decoded, relative to the first shape
    distinct    distinct answers per problem (diversity of the votes)

Means over problems, medians over --seeds. Run it before choosing a tree shape for a new model or task.

    python bench/tree_votes.py                                # built-in task, the default config's model
    python bench/tree_votes.py --shapes n:16 n:8 tree:3,2,2 tree:8,1,1 --problems 64 --seeds 2
    python bench/tree_votes.py --config configs/x.yaml data.train=my.jsonl   # any config + overrides
"""
from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

from ettrl.config import load_config
from ettrl.data import load_problems
from ettrl.prompts import encode_prompts, stop_strings
from ettrl.rewards import majority_vote, true_rewards
from ettrl.rollout import engine_options, make_llm, rollout
from ettrl.scoring import answers_of

DEFAULT_SHAPES = ["n:16", "n:8", "tree:3,2,2", "tree:4,1,2", "tree:5,1,2", "tree:4,2,1", "tree:8,1,1"]


def parse_shape(text: str, cfg):
    """'n:K' -> the config with method ttrl and n_votes K; 'tree:M,N,B' -> method etmr with that tree."""
    kind, _, spec = text.partition(":")
    try:
        values = [int(v) for v in spec.split(",")]
    except ValueError:
        values = []
    if kind == "n" and len(values) == 1:
        return replace(cfg, method="ttrl", rollout=replace(cfg.rollout, n_votes=values[0]))
    if kind == "tree" and len(values) == 3:
        m, n, b = values
        return replace(cfg, method="etmr", rollout=replace(cfg.rollout, trees=m, forks=n, branches=b))
    raise SystemExit(f"bad shape {text!r}: write n:K (K parallel samples) or tree:M,N,B (M roots, N forks, B branches)")


def score(groups) -> dict:
    label = sample = distinct = 0.0
    for g in groups:
        answers = answers_of(g)
        vote = majority_vote(answers)
        label += float(true_rewards([vote.label], g.problem.answer)[0]) if vote.label is not None else 0.0
        sample += sum(true_rewards(answers, g.problem.answer)) / len(answers)
        distinct += len({c for c in vote.class_ids if c >= 0})
    n = len(groups)
    return {"label_acc": label / n, "sample_acc": sample / n, "distinct": distinct / n,
            "leaves": sum(len(g.responses) for g in groups) / n, "tokens": sum(g.decoded_tokens for g in groups)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="a run config (default: the offline default)")
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    ap.add_argument("--problems", type=int, default=64, help="training problems to roll out (data.train)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    d = cfg.data
    problems = load_problems(d.train, split=d.train_split, problem_field=d.problem_field, answer_field=d.answer_field,
                             size=args.problems, difficulty=d.difficulty, seed=d.seed, key="data.train")
    if any(p.answer is None for p in problems):
        raise SystemExit(f"{d.train}: every problem needs a ground-truth answer ({d.answer_field!r}) to score votes")
    shapes = [(s, parse_shape(s, cfg)) for s in args.shapes]
    llm, tokenizer = make_llm(cfg.model.name, **engine_options(cfg.engine, cfg.device))
    ids, stop = encode_prompts(tokenizer, problems, d.prompt), stop_strings(d.prompt)
    runs = {s: [] for s, _ in shapes}
    for seed in range(args.seeds):
        for s, c in shapes:
            runs[s].append(score(rollout(llm, problems, ids, c, stop, 1000 * (seed + 1))))
            print(f"seed {seed} {s:12s} " + "  ".join(f"{k} {v:.3f}" for k, v in runs[s][-1].items()), flush=True)
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
    base = med[shapes[0][0]]["tokens"]
    print(f"\n{len(problems)} problems of {d.train}, {cfg.model.name}, T={cfg.rollout.temperature}, "
          f"median of {args.seeds} seeds\n")
    print("| shape | leaves | tokens | label_acc | sample_acc | distinct answers |\n|---|---|---|---|---|---|")
    for s, m in med.items():
        print(f"| {s} | {m['leaves']:.1f} | {m['tokens'] / base:.2f}x | {m['label_acc']:.3f} | {m['sample_acc']:.3f} "
              f"| {m['distinct']:.2f} |")


if __name__ == "__main__":
    main()
