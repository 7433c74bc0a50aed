"""Method sweep: the offline default (or any config) trained with each method x seed, one run at a time.

Each run is `python -m ettrl.run method=M seed=S ...` into OUT/M-seedS and leaves its summary.json there. The
sweep resumes where it stopped (a default run takes minutes; a sweep spans sittings): finished runs are skipped,
a run with a checkpoint continues from it (`--resume`), a run without one starts again. Runs go seed by seed,
so a partial sweep still compares methods on the same seeds. At the end (or with --report alone) it prints per
method the mean of each eval metric after training, its standard error, the mean change from before, and the
paired difference to the baseline method (same seeds) with a 95% t interval.

    python bench/methods.py --out runs/method-sweep                          # ttrl, etmr, ettrl x 8 seeds
    python bench/methods.py --out runs/method-sweep --methods ttrl ear --seeds 4 trainer.lr=5e-6
    python bench/methods.py --out runs/method-sweep --jobs 2                 # two single-thread runs at a time
    python bench/methods.py --out runs/method-sweep --report --markdown      # aggregate only, a docs table
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_METHODS = ("ttrl", "etmr", "ettrl")
METRICS = ("avg@16", "maj@16", "greedy", "pass@16")


# -- the sweep -------------------------------------------------------------------------------------------------

def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / f"{method}-seed{seed}"


def planned_runs(methods, seeds: int) -> list[tuple[str, int]]:
    """Seed-major: every method at seed 0, then at seed 1, ..."""
    return [(m, s) for s in range(seeds) for m in methods]


def run_state(path: Path) -> str:
    """done (summary.json written) | resume (a finished checkpoint) | fresh (nothing usable)."""
    if (path / "summary.json").is_file():
        return "done"
    ckpts = path / "checkpoints"
    if ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir()):
        return "resume"
    return "fresh"


def run_command(out: Path, method: str, seed: int, overrides: list[str], config: str | None,
                score_before: bool = True) -> list[str]:
    """score_before=False skips the eval before training: it depends on the seed only, not on the method, so one
    run per seed scores it and the report lends it to the others."""
    path = run_dir(out, method, seed)
    if run_state(path) == "resume":
        return [sys.executable, "-m", "ettrl.run", "--resume", str(path)]
    cmd = [sys.executable, "-m", "ettrl.run", "--run-dir", str(path)]
    if config:
        cmd += ["--config", config]
    return cmd + [f"method={method}", f"seed={seed}", *overrides] + ([] if score_before else ["eval.before=false"])


def check_sweep_file(out: Path, overrides: list[str], config: str | None) -> None:
    """A sweep keeps one recipe: resuming with other overrides would mix two experiments in one table."""
    recipe = {"config": config, "overrides": list(overrides)}
    path = out / "sweep.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != recipe:
            raise SystemExit(f"{out} holds a sweep of {saved}; this call asks for {recipe}. Use another --out.")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(recipe, indent=1))


def run_one(out: Path, method: str, seed: int, overrides: list[str], config: str | None, launch, log,
            threads: int | None, label: str, score_before: bool = True, keep_checkpoints: bool = False) -> bool:
    path = run_dir(out, method, seed)
    state = run_state(path)
    if state == "fresh" and path.exists():
        shutil.rmtree(path)  # a run killed before its first checkpoint starts again
    log(f"{label} {method} seed {seed} ({'resuming' if state == 'resume' else 'new'})")
    kwargs = {}
    if threads:  # one OpenMP team per run: two teams on two cores would spin against each other
        kwargs["env"] = dict(os.environ, OMP_NUM_THREADS=str(threads))
        kwargs["log_path"] = out / f"{method}-seed{seed}.log"
    result = launch(run_command(out, method, seed, overrides, config, score_before), **kwargs)
    ok = result.returncode == 0 and run_state(path) == "done"
    if not ok:
        log(f"{method} seed {seed} failed (exit {result.returncode}); see {path}")
    elif not keep_checkpoints:  # a finished run needs only its summary; a checkpoint is ~1.6 GB with AdamW state
        shutil.rmtree(path / "checkpoints", ignore_errors=True)
    return ok


def launch_run(cmd: list[str], env: dict | None = None, log_path: Path | None = None):
    """subprocess.run, with the output appended to log_path when runs share the terminal."""
    if log_path is None:
        return subprocess.run(cmd, env=env)
    with open(log_path, "a") as f:
        return subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)


def sweep(out: Path, methods, seeds: int, overrides: list[str], config: str | None = None,
          launch=launch_run, log=lambda line: print(line, flush=True), jobs: int = 1,
          keep_checkpoints: bool = False) -> None:
    """Runs the missing runs, `jobs` at a time (each with cores / jobs threads when jobs > 1), seed-major."""
    check_sweep_file(out, overrides, config)
    todo = [(m, s) for m, s in planned_runs(methods, seeds) if run_state(run_dir(out, m, s)) != "done"]
    log(f"{len(todo)} of {len(methods) * seeds} runs to go, {jobs} at a time")
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    failed: list[str] = []

    def one(i: int, method: str, seed: int) -> None:
        if failed:  # after a failure start nothing new: rerunning resumes
            return
        label, first = f"[{i}/{len(todo)}]", method == methods[0]
        if not run_one(out, method, seed, overrides, config, launch, log, threads, label, score_before=first,
                       keep_checkpoints=keep_checkpoints):
            failed.append(f"{method} seed {seed}")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda job: one(*job), [(i, m, s) for i, (m, s) in enumerate(todo, 1)]))
    if failed:
        raise SystemExit(f"{', '.join(failed)} failed; see their run folders under {out}. Rerun to resume.")


# -- the report ------------------------------------------------------------------------------------------------

def finished_runs(out: Path) -> list[tuple[str, int, Path]]:
    """(method, seed, run folder) of each run under `out` that wrote its summary.json."""
    found = []
    for path in sorted(out.glob("*-seed*/summary.json")):
        method, _, seed = path.parent.name.rpartition("-seed")
        found.append((method, int(seed), path.parent))
    return found


def load_summaries(out: Path) -> dict[str, dict[int, dict]]:
    """{method: {seed: summary}} of the finished runs under `out`; a run that skipped the eval before training
    takes it from a run of the same seed that has it (it depends on the seed, not on the method)."""
    runs: dict[str, dict[int, dict]] = {}
    for method, seed, path in finished_runs(out):
        runs.setdefault(method, {})[seed] = json.loads((path / "summary.json").read_text())
    befores = {s: r["before"] for by_seed in runs.values() for s, r in by_seed.items() if r.get("before")}
    for by_seed in runs.values():
        for s, r in by_seed.items():
            if not r.get("before") and s in befores:
                r["before"] = befores[s]
    return runs


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with df degrees of freedom (bisection on its CDF, Simpson's rule on the density)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, n: int = 2000) -> float:
        h = x / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_se(values: list[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def paired_difference(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float, int]:
    """Mean of a - b over the seeds both have, with the 95% t interval: (mean, low, high, n)."""
    diffs = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    if not diffs:
        return float("nan"), float("nan"), float("nan"), 0
    m, se = mean_se(diffs)
    half = t_quantile(0.975, len(diffs) - 1) * se if len(diffs) > 1 else float("nan")
    return m, m - half, m + half, len(diffs)


def baseline_first(runs: dict, baseline: str) -> list[str]:
    return sorted(runs, key=lambda m: (m != baseline, m))


def aggregate(runs: dict[str, dict[int, dict]], baseline: str = "ttrl", metrics=METRICS) -> list[dict]:
    """One row per method and metric: n, mean after, SE, mean change from before, paired difference to baseline."""
    rows = []
    for method in baseline_first(runs, baseline):
        by_seed = runs[method]
        for metric in metrics:
            after = {s: r["after"][metric] for s, r in by_seed.items()
                     if (r.get("after") or {}).get(metric) is not None}
            if not after:
                continue
            change = [r["after"][metric] - r["before"][metric] for s, r in by_seed.items()
                      if s in after and (r.get("before") or {}).get(metric) is not None]
            mean, se = mean_se(list(after.values()))
            row = {"method": method, "metric": metric, "n": len(after), "mean": mean, "se": se,
                   "change": statistics.fmean(change) if change else float("nan"),
                   "rose": sum(c > 0 for c in change), "fell": sum(c < 0 for c in change), "paired": len(change)}
            if method != baseline and baseline in runs:
                base = {s: r["after"][metric] for s, r in runs[baseline].items() if (r.get("after") or {}).get(metric)
                        is not None}
                row["diff"], row["low"], row["high"], row["pairs"] = paired_difference(after, base)
            rows.append(row)
    return rows


def format_rows(rows: list[dict], baseline: str = "ttrl", markdown: bool = False) -> str:
    head = ["method", "metric", "n", "after (mean ± SE)", "change", "rose / fell", f"vs {baseline} (95% CI, paired)"]
    lines = []
    for r in rows:
        vs = ""
        if "diff" in r and r["pairs"]:
            ci = "" if math.isnan(r["low"]) else f" [{100 * r['low']:+.1f}, {100 * r['high']:+.1f}]"
            vs = f"{100 * r['diff']:+.1f}{ci} (n={r['pairs']})"
        se = "" if math.isnan(r["se"]) else f" ± {100 * r['se']:.1f}"
        rose = f"{r['rose']} / {r['fell']} of {r['paired']}" if r.get("paired") else ""
        lines.append([r["method"], r["metric"], str(r["n"]), f"{100 * r['mean']:.1f}{se}",
                      f"{100 * r['change']:+.1f}", rose, vs])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in [head, *lines])


def per_seed_table(runs: dict[str, dict[int, dict]], metric: str = "avg@16", baseline: str = "ttrl") -> str:
    """Markdown: per seed, each method's metric after training (before it in the first row) and its rollout
    tokens as a share of the baseline's with the same seed."""
    seeds = sorted({s for by_seed in runs.values() for s in by_seed})
    methods = baseline_first(runs, baseline)
    lines = ["| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|" + "---|" * (len(seeds) + 2)]

    def row(label, values, digits=1):
        done = [v for v in values if v is not None]
        cells = ["" if v is None else f"{v:.{digits}f}" for v in values]
        return f"| {label} | " + " | ".join(cells) + f" | {statistics.fmean(done):.{digits}f} |" if done else ""

    befores = [next((by_seed[s]["before"][metric] * 100 for by_seed in runs.values()
                     if s in by_seed and by_seed[s].get("before")), None) for s in seeds]
    lines.append(row(f"{metric} before", befores))
    for m in methods:
        lines.append(row(f"{m} {metric}", [runs[m][s]["after"][metric] * 100 if s in runs[m] else None for s in seeds]))
    for m in methods[1:] if baseline in runs else []:
        shares = [runs[m][s]["rollout_tokens"] / runs[baseline][s]["rollout_tokens"]
                  if s in runs[m] and s in runs[baseline] else None for s in seeds]
        lines.append(row(f"{m} tokens / {baseline}", shares, digits=2))
    return "\n".join(line for line in lines if line)


def load_steps(out: Path, key: str = "label_acc") -> dict[str, dict[int, list[float]]]:
    """{method: {seed: [key at each training step]}} of the finished runs' metrics.jsonl ("train" rows)."""
    curves: dict[str, dict[int, list[float]]] = {}
    for method, seed, path in finished_runs(out):
        metrics = path / "metrics.jsonl"
        if metrics.is_file():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            steps = {r["step"]: r[key] for r in rows if r.get("type") == "train" and key in r}
            curves.setdefault(method, {})[seed] = [steps[k] for k in sorted(steps)]
    return curves


def per_step_table(curves: dict[str, dict[int, list[float]]], key: str = "label_acc", baseline: str = "ttrl") -> str:
    """Markdown: per method, the mean over its seeds of `key` at each training step, and over all steps."""
    methods = baseline_first(curves, baseline)
    steps = max((len(c) for by_seed in curves.values() for c in by_seed.values()), default=0)
    lines = [f"| {key} | seeds | " + " | ".join(str(k + 1) for k in range(steps)) + " | all steps |",
             "|" + "---|" * (steps + 3)]
    for m in methods:
        runs = list(curves[m].values())
        cells = [statistics.fmean(c[k] for c in runs if len(c) > k) if any(len(c) > k for c in runs) else None
                 for k in range(steps)]
        overall = statistics.fmean(v for c in runs for v in c)
        lines.append(f"| {m} | {len(runs)} | " + " | ".join("" if v is None else f"{v:.2f}" for v in cells)
                     + f" | {overall:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/method-sweep", help="one folder per sweep; rerun it to resume")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once, each with cores / jobs threads (2 single-thread runs beat one run of two "
                         "threads when other work shares the cores)")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep finished runs' checkpoints (deleted by default: 24 default runs hold ~75 GB)")
    ap.add_argument("--config", help="a YAML config (default: the offline default)")
    ap.add_argument("--baseline", default="ttrl", help="the method the paired differences are taken against")
    ap.add_argument("--report", action="store_true", help="only aggregate the finished runs")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not args.report:
        sweep(out, args.methods, args.seeds, args.overrides, args.config, jobs=args.jobs,
              keep_checkpoints=args.keep_checkpoints)
    runs = load_summaries(out)
    if not runs:
        raise SystemExit(f"no finished runs under {out}")
    print(format_rows(aggregate(runs, args.baseline), args.baseline, args.markdown))
    curves = load_steps(out)
    if args.markdown:
        for metric in ("avg@16", "maj@16", "greedy"):
            print()
            print(per_seed_table(runs, metric, args.baseline))
        if curves:
            print()
            print(per_step_table(curves, "label_acc", args.baseline))
    elif curves:
        for m in baseline_first(curves, args.baseline):
            steps = [v for c in curves[m].values() for v in c]
            print(f"{m}: pseudo-label accuracy over {len(curves[m])} seeds' steps {statistics.fmean(steps):.2f}")


if __name__ == "__main__":
    main()
