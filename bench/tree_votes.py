"""Votes per token: how good is the pseudo-label of an ETMR tree against parallel sampling at equal tokens?

For every problem (with a known answer) and every fork option this samples ONE large tree (M = 12 roots, N = 2
forks, B = 3 branches) and ONE parallel draw of n = 32 per stop setting, and derives the rest as subsets:
roots 0..M'-1, the top-1 fork of the top-2 (what N = 1 would pick), branches 0..B'-1; parallel n as the first
n samples (a sample's noise depends on its index, not on n). Label accuracy = the majority answer (TTRL's vote
over the trainer's grader) equals the truth. Each tree shape is paired per problem with parallel sampling
interpolated to the same decoded tokens; the tables give the mean difference +- its standard error over
problems. Roots are parallel samples 0..M-1 of the same seed, so the pairing is tight.

    python bench/tree_votes.py sample --level 1 --problems 200 --out runs/votes/level1.jsonl   # resumable
    python bench/tree_votes.py report runs/votes/level1.jsonl runs/votes/level3.jsonl --plot docs/tree-votes.png

Options (fork metric, `distinct`, `no_fork_after`, `min_gap`, stop at the first complete boxed answer) are in
OPTIONS, each one change from the base; a vote-aware tree (branches only for prompts whose roots disagree,
`sample_tree(select_roots=...)`) is derived from the same trees, since a leaf's tokens do not depend on when it
is forked.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from ettrl.arithmetic import generate
from ettrl.data import Problem
from ettrl.grading import BOXED_ANSWER_REGEX, extract_answer
from ettrl.prompts import encode_prompts, fewshot_examples, stop_strings
from ettrl.rewards import majority_vote, true_rewards
from ettrl.vote_aware import roots_disagree

BOX = "\\boxed{"
BIG = (12, 2, 3)  # M, N, B sampled; every smaller shape is a subset
PARALLEL_N = 32
OPTIONS = {  # name -> TreeParams fields, plus "stop": stop at the first complete boxed answer. The first is the
    # base (Algorithm 1's surprisal, the trainer's stop and no_fork_after); each other changes one thing.
    "base": {"metric": "surprisal", "no_fork_after": [BOX], "stop": True},
    "entropy": {"metric": "entropy", "no_fork_after": [BOX], "stop": True},
    "distinct": {"metric": "surprisal", "no_fork_after": [BOX], "stop": True, "distinct": True},
    "min_gap4": {"metric": "surprisal", "no_fork_after": [BOX], "stop": True, "min_gap": 4},
    "forks_anywhere": {"metric": "surprisal", "stop": True},  # no no_fork_after
    "no_stop": {"metric": "surprisal", "no_fork_after": [BOX]},
}
SHAPES = [(m, n, b) for m in (2, 3, 4, 6, 8, 12) for n in (1, 2) for b in (1, 2, 3)]


# ---- sampling --------------------------------------------------------------------------------------------------

def problems_of(level: int, count: int, seed: int) -> list[Problem]:
    return [Problem(p["problem"], p["answer"]) for p in generate(count, level, seed, "train")]


def sampling(stop: bool, n: int, seed: int, args, stop_strings_: list[str]):
    from engine import SamplingParams
    return SamplingParams(n=n, temperature=args.temperature, max_tokens=args.max_tokens, seed=seed,
                          stop=stop_strings_, stop_regex=[BOXED_ANSWER_REGEX] if stop else None,
                          include_stop_str_in_output=True)


def answer_of(out) -> str | None:
    """The trainer's rule: a response cut by the length limit never votes."""
    return None if out.finish_reason == "length" else extract_answer(out.text)


def sample_batch(llm, ids: list[list[int]], seeds: list[int], args, stops: list[str]) -> list[dict]:
    from engine import TreeParams
    m, n, b = BIG
    records = [{"parallel": {}, "trees": {}, "wall": {}} for _ in ids]
    for stop in (False, True):
        start = time.perf_counter()
        outs = llm.generate(ids, [sampling(stop, PARALLEL_N, s, args, stops) for s in seeds])
        for rec, out in zip(records, outs):
            rec["parallel"]["stop" if stop else "nostop"] = [[answer_of(o), len(o.token_ids)] for o in out.outputs]
            rec["wall"]["parallel-" + ("stop" if stop else "nostop")] = (time.perf_counter() - start) / len(ids)
    for name, option in OPTIONS.items():
        fields = {k: v for k, v in option.items() if k != "stop"}
        tp = TreeParams(trees=m, forks=n, branches=b, **fields)
        start = time.perf_counter()
        trees = llm.sample_tree(ids, tp, [sampling(option.get("stop", False), 1, s, args, stops) for s in seeds])
        for rec, tree in zip(records, trees):
            rec["trees"][name] = tree_record(tree, option["metric"])
            rec["wall"][name] = (time.perf_counter() - start) / len(ids)  # this problem's share
    return records


def tree_record(tree, metric: str) -> dict:
    """Roots [answer, tokens, fork positions ranked best first] and branches [root, fork rank, branch, answer,
    tokens decoded by the branch]."""
    roots = {leaf.root: leaf for leaf in tree.leaves if leaf.fork_position is None}
    ranked = {}
    for r, root in roots.items():
        score = root.entropies if metric == "entropy" else [-lp for lp in root.logprobs]
        ranked[r] = sorted(tree.fork_positions[r], key=lambda t: (-score[t], t))
    return {
        "roots": [[answer_of(roots[r]), len(roots[r].token_ids), ranked[r]] for r in sorted(roots)],
        "branches": [[leaf.root, ranked[leaf.root].index(leaf.fork_position), leaf.branch, answer_of(leaf),
                      len(leaf.token_ids) - leaf.fork_position]
                     for leaf in tree.leaves if leaf.fork_position is not None],
    }


def sample(args):
    from ettrl.rollout import make_llm
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["index"] for line in out.read_text().splitlines()} if out.exists() else set()
    problems = problems_of(args.level, args.problems, args.data_seed)
    llm, tokenizer = make_llm(args.model, args.dtype, "auto", max_num_seqs=args.max_num_seqs)
    ids = encode_prompts(tokenizer, problems, "fewshot", fewshot_examples("arithmetic", args.level))
    todo = [i for i in range(len(problems)) if i not in done]
    start = time.perf_counter()
    for k in range(0, len(todo), args.batch):
        batch = todo[k:k + args.batch]
        records = sample_batch(llm, [ids[i] for i in batch], [args.seed + i for i in batch], args,
                               stop_strings("fewshot"))
        with out.open("a") as f:
            for i, rec in zip(batch, records):
                f.write(json.dumps({"index": i, "answer": problems[i].answer, "level": args.level, **rec}) + "\n")
        print(f"{k + len(batch)}/{len(todo)} problems, {time.perf_counter() - start:.0f} s", flush=True)


# ---- deriving shapes and scoring -------------------------------------------------------------------------------

def correct(answers: list[str | None], truth: str, cache: dict) -> float:
    key = tuple(answers)
    if key not in cache:
        label = majority_vote(answers).label
        cache[key] = 0.0 if label is None else true_rewards([label], truth)[0]
    return cache[key]


def shape_leaves(tree: dict, m: int, n: int, b: int, fork_roots=None) -> tuple[list, int]:
    """Answers and decoded tokens of the subset tree (M', N', B'); fork_roots: roots allowed to branch."""
    roots = tree["roots"][:m]
    answers, tokens = [r[0] for r in roots], sum(r[1] for r in roots)
    for r, rank, branch, answer, own in tree["branches"]:
        if r < m and rank < n and branch < b and (fork_roots is None or r in fork_roots):
            answers.append(answer)
            tokens += own
    return answers, tokens


def disagreeing_roots(tree: dict, m: int) -> set[int]:
    """ettrl/vote_aware.py's rule: every root branches when the M' roots do not all give one answer, none
    otherwise (the same leaves as sample_tree with that select_roots: a leaf does not depend on when it forks)."""
    return set(range(m)) if roots_disagree([r[0] for r in tree["roots"][:m]]) else set()


@dataclass
class Curve:
    """Parallel sampling of one problem: cumulative tokens and label correctness at n = 1..32."""
    tokens: list[int]
    correct: list[float]

    def at(self, tokens: float) -> float:
        """Correctness interpolated linearly in tokens (clamped to n = 1 and n = 32)."""
        t, c = self.tokens, self.correct
        if tokens <= t[0]:
            return c[0]
        for k in range(1, len(t)):
            if tokens <= t[k]:
                w = (tokens - t[k - 1]) / max(1, t[k] - t[k - 1])
                return c[k - 1] + w * (c[k] - c[k - 1])
        return c[-1]

    def tokens_of(self, leaves: int) -> float:
        """Tokens of `leaves` parallel samples (past n = 32 at the mean tokens per sample)."""
        return self.tokens[leaves - 1] if leaves <= len(self.tokens) else self.tokens[-1] * leaves / len(self.tokens)


def parallel_curve(samples: list, truth: str, cache: dict) -> Curve:
    tokens, acc, total = [], [], 0
    for n in range(1, len(samples) + 1):
        total += samples[n - 1][1]
        tokens.append(total)
        acc.append(correct([s[0] for s in samples[:n]], truth, cache))
    return Curve(tokens, acc)


def mean_se(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0] if values else math.nan), math.nan
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def score_option(records: list[dict], option: str, vote_aware: bool = False) -> list[dict]:
    stop = "stop" if OPTIONS[option].get("stop") else "nostop"
    rows = []
    cache: dict = {}
    curves = [parallel_curve(r["parallel"][stop], r["answer"], cache) for r in records]
    for m, n, b in SHAPES:
        diffs, accs, tokens, ratios, leaf_ratios, beyond = [], [], [], [], [], 0
        for rec, curve in zip(records, curves):
            tree = rec["trees"][option]
            allowed = disagreeing_roots(tree, m) if vote_aware else None
            answers, used = shape_leaves(tree, m, n, b, allowed)
            acc = correct(answers, rec["answer"], cache)
            diffs.append(acc - curve.at(used))
            accs.append(acc)
            tokens.append(used)
            ratios.append(used / curve.tokens_of(len(answers)))
            beyond += used > curve.tokens[-1]
            leaf_ratios.append(used / len(answers))
        d, se = mean_se(diffs)
        rows.append({"shape": f"{m},{n},{b}", "acc": statistics.fmean(accs), "tokens": statistics.fmean(tokens),
                     "diff": d, "se": se, "diffs": diffs, "ratio": statistics.fmean(ratios),
                     "tokens_per_leaf": statistics.fmean(leaf_ratios), "beyond": beyond / len(records)})
    return rows


def comparable(rows: list[dict], limit: float = 0.05) -> list[dict]:
    """Shapes whose tokens stay within parallel n = 32 for all but `limit` of the problems."""
    return [r for r in rows if r["beyond"] <= limit]


def per_problem(rows: list[dict], n_problems: int) -> list[float]:
    """Each problem's trees - parallel difference, averaged over the shapes of `rows`."""
    return [statistics.fmean(r["diffs"][i] for r in rows) for i in range(n_problems)]


def parallel_rows(records: list[dict], stop: str) -> list[dict]:
    cache: dict = {}
    curves = [parallel_curve(r["parallel"][stop], r["answer"], cache) for r in records]
    return [{"n": n, "acc": statistics.fmean(c.correct[n - 1] for c in curves),
             "tokens": statistics.fmean(c.tokens[n - 1] for c in curves)} for n in (1, 2, 4, 8, 12, 16, 24, 32)]


def echo_stats(records: list[dict], option: str) -> dict:
    """How often a branch gives its root's answer, against two independent samples; mean fork depth."""
    same = pairs = indep = indep_pairs = 0
    depth = []
    for rec in records:
        tree = rec["trees"][option]
        for r, rank, _, answer, own in tree["branches"]:
            root_answer, root_len, forks = tree["roots"][r]
            pairs += 1
            same += answer is not None and answer == root_answer
            depth.append(forks[rank] / max(1, root_len))
        roots = [a for a, *_ in tree["roots"]]
        for i in range(0, len(roots) - 1, 2):
            indep_pairs += 1
            indep += roots[i] is not None and roots[i] == roots[i + 1]
    return {"branch_root_agree": same / max(1, pairs), "independent_agree": indep / max(1, indep_pairs),
            "fork_depth": statistics.fmean(depth) if depth else math.nan}


def load(paths: list[str]) -> dict[int, list[dict]]:
    by_level: dict[int, list[dict]] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            rec = json.loads(line)
            by_level.setdefault(rec["level"], []).append(rec)
    return by_level


def report(args):
    for level, records in sorted(load(args.files).items()):
        print(f"\n### Level {level}: {len(records)} problems\n")
        for stop in ("nostop", "stop"):
            rows = parallel_rows(records, stop)
            points = ", ".join(f"n={r['n']} {r['acc']:.3f} @ {r['tokens']:.0f} tok" for r in rows)
            print(f"parallel ({stop}): {points}")
        scored = {(option, aware): score_option(records, option, aware)
                  for option in OPTIONS for aware in (False, True)}
        shared = set.intersection(*({r["shape"] for r in comparable(scored[o, False])} for o in OPTIONS))
        base = per_problem([r for r in scored[next(iter(OPTIONS)), False] if r["shape"] in shared], len(records))
        echoes = {option: echo_stats(records, option) for option in OPTIONS}
        print("\n| option | best shape | trees - parallel at equal tokens (points, mean +- s.e. over problems) | "
              "mean over shapes (+- s.e. over problems) | vs base, paired (shapes all options share) | "
              "tokens vs parallel of as many leaves | branch = root answer | two roots agree | fork depth |")
        print("|---|---|---|---|---|---|---|---|---|")
        for (option, aware), all_rows in scored.items():
            rows = comparable(all_rows)
            best = max(rows, key=lambda r: r["diff"])
            echo = echoes[option]
            name = option + (" + vote-aware" if aware else "")
            over_shapes = mean_se(per_problem(rows, len(records)))
            in_shared = per_problem([r for r in all_rows if r["shape"] in shared], len(records))
            vs_base = mean_se([a - b for a, b in zip(in_shared, base)])
            print(f"| {name} | {best['shape']} | {100 * best['diff']:+.1f} +- {100 * best['se']:.1f} | "
                  f"{100 * over_shapes[0]:+.1f} +- {100 * over_shapes[1]:.1f} | "
                  f"{100 * vs_base[0]:+.1f} +- {100 * vs_base[1]:.1f} | "
                  f"{statistics.fmean(r['ratio'] for r in rows):.2f} | {echo['branch_root_agree']:.2f} | "
                  f"{echo['independent_agree']:.2f} | {echo['fork_depth']:.2f} |")
        if args.shapes:
            for option in args.shapes:
                print(f"\n{option}, level {level}: per shape\n\n| M,N,B | label acc | tokens | trees - parallel "
                      f"(points +- s.e.) | tokens vs parallel of as many leaves | past n = 32 |\n"
                      f"|---|---|---|---|---|---|")
                for r in scored[option, False]:
                    print(f"| {r['shape']} | {r['acc']:.3f} | {r['tokens']:.0f} | {100 * r['diff']:+.1f} +- "
                          f"{100 * r['se']:.1f} | {r['ratio']:.2f} | {r['beyond']:.0%} |")
                for forks in (1, 2):
                    rows = [r for r in comparable(scored[option, False]) if r["shape"].split(",")[1] == str(forks)]
                    d, se = mean_se(per_problem(rows, len(records)))
                    ratios = [r["ratio"] for r in rows]
                    print(f"| the {len(rows)} comparable {forks}-fork shapes | | | {100 * d:+.1f} +- {100 * se:.1f} | "
                          f"{min(ratios):.2f}-{max(ratios):.2f} | |")
        walls = {k: sum(r["wall"][k] for r in records) for k in records[0]["wall"]}
        shares = ", ".join(f"{k} {v:.0f}" for k, v in walls.items())
        print(f"\nwall seconds (each batch's time shared by its problems, summed): {shares}")


def plot(by_level: dict[int, list[dict]], path: str) -> None:
    """Label accuracy against decoded tokens per prompt: parallel n = 1..32 as curves, tree shapes as points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_level), figsize=(6.5 * len(by_level), 4.8), squeeze=False)
    for ax, (level, records) in zip(axes[0], sorted(by_level.items())):
        for stop, style in (("nostop", "k--"), ("stop", "k-")):
            cache: dict = {}
            curves = [parallel_curve(r["parallel"][stop], r["answer"], cache) for r in records]
            ns = range(1, PARALLEL_N + 1)
            ax.plot([statistics.fmean(c.tokens[n - 1] for c in curves) for n in ns],
                    [statistics.fmean(c.correct[n - 1] for c in curves) for n in ns], style,
                    label=f"parallel n=1..32 ({'stop at answer' if stop == 'stop' else 'no stop'})")
        for option, marker in zip(OPTIONS, "os^vDx"):
            rows = comparable(score_option(records, option))
            ax.scatter([r["tokens"] for r in rows], [r["acc"] for r in rows], marker=marker, s=18, label=option)
        ax.set_xscale("log")
        ax.set_xlabel("decoded tokens per prompt")
        ax.set_ylabel("label accuracy (majority == truth)")
        ax.set_title(f"level {level}: {len(records)} problems, SmolLM2-135M")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="sample the big trees and parallel draws (appends; resumes)")
    s.add_argument("--level", type=int, default=1, choices=(1, 2, 3))
    s.add_argument("--problems", type=int, default=200)
    s.add_argument("--data-seed", type=int, default=0)
    s.add_argument("--seed", type=int, default=7000, help="problem i uses seed + i")
    s.add_argument("--model", default="smollm2-135m-instruct")
    s.add_argument("--dtype", default="bfloat16")
    s.add_argument("--temperature", type=float, default=0.6)
    s.add_argument("--max-tokens", type=int, default=48)
    s.add_argument("--batch", type=int, default=8, help="problems per engine call")
    s.add_argument("--max-num-seqs", type=int, default=256)
    s.add_argument("--out", required=True)
    r = sub.add_parser("report", help="tables from sampled files")
    r.add_argument("files", nargs="+")
    r.add_argument("--shapes", nargs="*", default=[], help="options to print per shape")
    r.add_argument("--plot", help="write the accuracy-vs-tokens figure here (PNG)")
    args = ap.parse_args()
    if args.command == "sample":
        sample(args)
    else:
        report(args)
        if args.plot:
            plot(load(args.files), args.plot)


if __name__ == "__main__":
    main()
