"""Mutation testing of the learning-signal path and the sampler (not in CI: minutes to hours).

    pip install -e ".[mutation]"              # mutmut >= 3.3
    python tools/mutation.py                  # everything, capped at 25 minutes
    python tools/mutation.py --minutes 10 --only scoring,advantages --no-tool

Runs on a scratch copy of the last commit (git archive HEAD, plus the built extensions), never on the work tree, so
nothing a mutant changes can leak into the repository or into other people's test runs. Two kinds of mutants:

- mutmut on each module of MODULES, running only that module's test files (TESTS) against each mutant;
- hand-planted mutants (HAND_MUTANTS) for what mutmut cannot reach: module-level tables, @triton.jit kernels, the
  engine's sampling call, the planted bugs of docs/testing.md, and (with --cpp, which rebuilds the extension in
  the scratch copy) the C++ sampler. Each is a text replacement; a mutant whose text is no longer in the file is
  reported as "stale" (update it).

The time cap is split over the parts in order (hand mutants first); mutmut's unchecked mutants are reported as
such. The report (kill rate per module, every surviving mutant) goes to stdout and <workdir>/report.md;
docs/testing.md keeps the last one with the reasons survivors are equivalent.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLER_TESTS = ["tests/test_noise.py", "tests/test_sampling_inputs.py", "tests/test_sampling_backends.py",
                 "tests/test_entropy_sample.py", "tests/test_entropy_sample_cpu.py",
                 "tests/test_truncation_thresholds.py", "tests/test_sampling_torch_routes.py"]
SAMPLER_ARGS = ["-k", "not compile_for_cuda"]  # that test compiles for a GPU in a subprocess (minutes)

# module -> (file, test files, extra pytest arguments)
MODULES = {
    "scoring": ("ettrl/scoring.py", ["tests/test_scoring.py"], []),
    "rollout": ("ettrl/rollout.py", ["tests/test_rollout.py"], []),
    "rewards": ("ettrl/rewards.py", ["tests/test_rewards.py", "tests/test_scoring.py"], []),
    "advantages": ("ettrl/advantages.py", ["tests/test_advantages.py", "tests/test_advantage_groups.py"], []),
    "loss": ("ettrl/loss.py", ["tests/test_loss.py"], []),
    "update": ("ettrl/update.py", ["tests/test_update.py", "tests/test_policy.py"], []),
    "samples": ("ettrl/samples.py", ["tests/test_update.py", "tests/test_scoring.py"], []),
    "sampling": ("kernels/ettrl_kernels/sampling.py", SAMPLER_TESTS, SAMPLER_ARGS),
    "sampling_common": ("kernels/ettrl_kernels/sampling_common.py", SAMPLER_TESTS, SAMPLER_ARGS),
    "sampling_torch": ("kernels/ettrl_kernels/sampling_torch.py", SAMPLER_TESTS, SAMPLER_ARGS),
    "sampling_cpu": ("kernels/ettrl_kernels/sampling_cpu.py", SAMPLER_TESTS, SAMPLER_ARGS),
    "backend": ("kernels/ettrl_kernels/backend.py", SAMPLER_TESTS, SAMPLER_ARGS),
    "sampling_triton": ("kernels/ettrl_kernels/sampling_triton.py", SAMPLER_TESTS, SAMPLER_ARGS),
    "noise": ("kernels/ettrl_kernels/noise.py", SAMPLER_TESTS, SAMPLER_ARGS),
}


@dataclass
class Hand:
    name: str
    path: str
    old: str
    new: str
    tests: list[str]
    why: str
    cpp: bool = False


S, R, ES = "ettrl/scoring.py", "ettrl/rollout.py", "tests/test_engine_sampling.py"
T, TR = "kernels/ettrl_kernels/sampling_torch.py", "kernels/ettrl_kernels/sampling_triton.py"
CPP, ENGINE = "csrc/entropy_sample.cpp", "engine/llm_engine.py"
HAND_MUTANTS = [
    # docs/testing.md, "Planted bugs"
    Hand("rewards-by-position", S, "compute_advantages([rewards[i] for i in keep]",
         "compute_advantages([rewards[j] for j in range(len(keep))]", ["tests/test_scoring.py"],
         "advantages get the first len(keep) rewards instead of the kept responses'"),
    Hand("res-is-grpo", S, "AdvantageConfig(shaping=cfg.shaping,", 'AdvantageConfig(shaping="none",',
         ["tests/test_scoring.py"], "scoring drops the config's shaping: Adv-Res silently off"),
    Hand("methods-ettrl-no-res", "ettrl/methods.py", 'Method("ettrl", "tree", "majority", "res"',
         'Method("ettrl", "tree", "majority", "none"', ["tests/test_scoring.py"],
         "methods table (module level): ETTRL without Adv-Res"),
    Hand("methods-dare-majority", "ettrl/rewards.py", '"dare": _dare}', '"dare": _majority}',
         ["tests/test_scoring.py"], "REWARDS table (module level): DARE rewarded by the plain vote"),
    Hand("methods-ear-no-res", "ettrl/methods.py", 'Method("ear", "parallel", "majority", "res"',
         'Method("ear", "parallel", "majority", "clip"', ["tests/test_scoring.py"],
         "methods table (module level): EAR with Adv-Clip instead of Adv-Res"),
    Hand("methods-rent-majority", "ettrl/methods.py", 'Method("rent", "parallel", "rent"',
         'Method("rent", "parallel", "majority"', ["tests/test_scoring.py"],
         "methods table (module level): RENT rewarded by the vote"),
    Hand("truncated-vote", S, 'None if r.finish_reason == "length" else extract_answer', "extract_answer",
         ["tests/test_scoring.py"], "truncated responses vote"),
    Hand("entropies-are-surprisals", R, "[float(h) for h in out.entropies]", "[-float(lp) for lp in out.logprobs]",
         ["tests/test_rollout.py"], "Response.entropies filled with -logprobs"),
    Hand("engine-ignores-top-p", ENGINE, "[s.params.top_p for s in seqs]", "[1.0 for s in seqs]", [ES],
         "the engine's sampling call: top_p always 1"),
    Hand("groups-dropped", "ettrl/advantages.py", "a = grpo_advantages(rewards, group_size, groups,",
         "a = grpo_advantages(rewards, None, None,", ["tests/test_advantage_groups.py", "tests/test_advantages.py"],
         "compute_advantages drops its per-group argument"),
    Hand("no-minus-inf-fallback", T, "if bool(nan_rows.any()):", "if False:", ["tests/test_sampling_backends.py"],
         "torch sampling path without its -inf fallback"),
    # the engine's sampling call
    Hand("engine-ignores-top-k", ENGINE, "[s.params.top_k for s in seqs]", "[-1 for s in seqs]", [ES],
         "the engine's sampling call: top_k off"),
    Hand("engine-ignores-temperature", ENGINE, "[s.params.temperature for s in seqs]", "[1.0 for s in seqs]", [ES],
         "the engine's sampling call: temperature 1"),
    Hand("engine-ignores-exclude", ENGINE, "[s.exclude_token for s in seqs]", "[-1 for s in seqs]", [ES],
         "the engine's sampling call: nothing excluded (distinct branches may repeat the root)"),
    Hand("engine-one-seq-id", ENGINE, "[s.seq_id for s in seqs]", "[0 for s in seqs]", [ES],
         "the engine's sampling call: all samples share one noise stream"),
    # the backend table
    Hand("cpp-takes-top-p", "kernels/ettrl_kernels/backend.py", '        return "it does no top-k / top-p"\n',
         "        pass\n", ["tests/test_sampling_backends.py", "tests/test_entropy_sample_cpu.py"],
         "the backend table lets the C++ op (no top-k / top-p) sample truncated rows"),
    # the torch path
    Hand("bf16-product-rounded", T, "    if chunk.dtype == torch.float32:\n        return torch.mul(",
         "    if True:\n        return torch.mul(", ["tests/test_sampling_backends.py"],
         "bf16 logits * 1/T rounded to bf16 (a bug the torch path once had)"),
    # module-level constants of the noise
    Hand("gumbel-max-bound", "kernels/ettrl_kernels/noise.py", "GUMBEL_MAX = -math.log(-math.log1p(-U_SCALE))",
         "GUMBEL_MAX = 2.0", SAMPLER_TESTS, "the pruning bound of the noise too small"),
    Hand("mix-constant", "kernels/ettrl_kernels/noise.py", "MIX_MUL1 = 0x7FEB352D", "MIX_MUL1 = 0x7FEB352F",
         SAMPLER_TESTS, "another hash constant (the noise is still uniform-looking)"),
    # @triton.jit
    Hand("triton-no-exclude", TR, "& (logit >= threshold) & (offs != excluded)", "& (logit >= threshold)",
         ["tests/test_sampling_backends.py"], "Triton kernel ignores exclude"),
    Hand("triton-noise-sign", TR, "score = tl.where(greedy, x, x - noise)", "score = tl.where(greedy, x, x + noise)",
         ["tests/test_sampling_backends.py"], "Triton kernel adds log(-log u) instead of the Gumbel noise"),
    Hand("triton-entropy-partial", TR, "tl.store(s_ptr + part, s)", "tl.store(s_ptr + part, 0.5 * s)",
         ["tests/test_sampling_backends.py"], "Triton entropy: a slice's partial sum halved"),
    Hand("triton-nan-unseen", TR, "bad |= tl.max(", "bad &= tl.max(", ["tests/test_sampling_inputs.py"],
         "Triton kernel never flags NaN / +inf logits"),
    Hand("triton-no-threshold", TR, "& (logit >= threshold) & (offs", "& (offs", ["tests/test_sampling_backends.py"],
         "Triton kernel ignores top-k / top-p"),
    Hand("triton-hash-shift", TR, "    h ^= h >> 15\n", "    h ^= h >> 13\n", ["tests/test_sampling_backends.py"],
         "Triton noise hash differs from noise.py"),
    Hand("triton-later-tie", TR, "better = tile_best > best", "better = tile_best >= best",
         ["tests/test_sampling_backends.py", "tests/test_entropy_sample.py"],
         "Triton keeps the last of equal tile maxima (a tie of two Gumbel scores: measure zero)"),
    # C++ (--cpp: rebuilds ettrl_kernels._C in the scratch copy)
    Hand("cpp-no-exclude", CPP, "    x[excluded] = -INFINITY;", "    x[excluded] = x[excluded];",
         ["tests/test_sampling_backends.py"], "C++ sampler ignores exclude", cpp=True),
    Hand("cpp-noise-sign", CPP, "const float score = x[j] - log_neg_log_u(key, j);",
         "const float score = x[j] + log_neg_log_u(key, j);", ["tests/test_sampling_backends.py"],
         "C++ sampler adds log(-log u)", cpp=True),
    Hand("cpp-minus-inf-entropy", CPP, "w += d == -INFINITY ? 0.f : e * d;", "w += e * d;",
         ["tests/test_sampling_backends.py"], "C++ entropy with -inf logits (0 * -inf)", cpp=True),
    Hand("cpp-logprob", CPP, "a.logprobs[r] = x[token] - lse;", "a.logprobs[r] = x[token];",
         ["tests/test_sampling_backends.py"], "C++ logprob not normalised", cpp=True),
]


def scratch_copy(dest: Path) -> Path:
    """The last commit plus the built extensions, at dest."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for so in [*ROOT.glob("engine/_C*.so"), *ROOT.glob("kernels/ettrl_kernels/_C*.so")]:
        shutil.copy(so, dest / so.relative_to(ROOT))
    return dest


def env_for(base: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{base / 'kernels'}:{base}", TRITON_INTERPRET="1")
    env.pop("PYTEST_ADDOPTS", None)
    return env


def pytest_cmd(tests: list[str], extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *extra, *tests]


def run_hand(mutants: list[Hand], work: Path, deadline: float, cpp: bool) -> list[tuple[Hand, str]]:
    shutil.rmtree(work / "hand", ignore_errors=True)  # hand mutants always run on the last commit
    tree = scratch_copy(work / "hand")
    out = []
    for m in mutants:
        if m.cpp and not cpp:
            out.append((m, "not run (--cpp)"))
            continue
        path = tree / m.path
        if not path.exists() or m.old not in path.read_text():
            out.append((m, "stale"))
            continue
        left = deadline - time.time()
        if left < 30:
            out.append((m, "not run (time cap)"))
            continue
        source = path.read_text()
        path.write_text(source.replace(m.old, m.new, 1))
        try:
            if m.cpp:
                subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, check=True,
                               capture_output=True, env=env_for(tree), timeout=left)
            tests = [t for t in m.tests if (tree / t).exists()]
            result = subprocess.run(pytest_cmd(tests, SAMPLER_ARGS if tests == SAMPLER_TESTS else []), cwd=tree,
                                    env=env_for(tree), capture_output=True, text=True, timeout=max(30, left))
            status = "killed" if result.returncode == 1 else "survived" if result.returncode == 0 else \
                f"error (pytest exit {result.returncode})"
            if status == "killed":
                failed = re.findall(r"^FAILED (\S+)", result.stdout, re.M)
                status += f" by {failed[0] if failed else '?'}"
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            path.write_text(source)
        if m.cpp:
            subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree,
                           capture_output=True, env=env_for(tree))
        print(f"  hand {m.name}: {status}", flush=True)
        out.append((m, status))
    return out


def prepare_mutmut_tree(tree: Path, path: str, tests: list[str], extra: list[str], kernels: str) -> None:
    """A scratch copy at tree with mutmut's setup.cfg for one module (path relative to the copy's root)."""
    scratch_copy(tree)
    if kernels == "ettrl_kernels":
        shutil.move(tree / "kernels" / "ettrl_kernels", tree / "ettrl_kernels")
    tests = [t for t in tests if (tree / t).exists()]
    lines = "\n    ".join
    (tree / "setup.cfg").write_text(
        f"[mutmut]\nsource_paths =\n    ettrl\n    engine\n    {kernels}\nonly_mutate =\n    {path}\n"
        f"pytest_add_cli_args_test_selection =\n    {lines(tests)}\n"
        f"pytest_add_cli_args =\n    {lines(['-x', '-q', '-p', 'no:cacheprovider', *extra])}\n"
        "process_isolation = forkserver\n")
    (tree / "mutants" / "kernels").mkdir(parents=True)  # on sys.path from the start (an absent entry is cached)


def run_mutmut(name: str, work: Path, seconds: float, children: int) -> dict:
    """mutmut on one module in its own scratch copy: {mutant name: status} (unchecked ones included).

    A scratch copy left by an earlier run in the same workdir is reused as it is (its commit, its verdicts): mutmut
    skips the mutants it has already decided, so a capped run goes on where the last one stopped."""
    path, tests, extra = MODULES[name]
    tree = work / f"mutmut-{name}"
    if path.startswith("kernels/"):
        # mutmut names a mutant by its file's path and activates it by the module's import name: the two agree
        # only when the package sits at the root (kernels/ettrl_kernels/noise.py imports as ettrl_kernels.noise)
        path, kernels = path.removeprefix("kernels/"), "ettrl_kernels"
    else:
        kernels = "kernels"
    if (tree / "setup.cfg").exists():
        print(f"  {name}: resuming {tree}", flush=True)
    else:
        if tree.exists():
            shutil.rmtree(tree)
        prepare_mutmut_tree(tree, path, tests, extra, kernels)
    tests = [t for t in tests if (tree / t).exists()]
    if not (tree / path).exists() or not tests:
        return {}
    env = env_for(tree / "mutants")
    try:
        subprocess.run(["mutmut", "run", "--max-children", str(children)], cwd=tree, env=env, timeout=seconds,
                       capture_output=True)
    except subprocess.TimeoutExpired:
        pass
    result = subprocess.run(["mutmut", "results", "--all", "true"], cwd=tree, env=env, capture_output=True,
                            text=True)
    statuses = dict(re.findall(r"^\s*(\S+): (.+)$", result.stdout, re.M))
    survivors = [k for k, v in statuses.items() if v == "survived"]
    for k in survivors:
        diff = subprocess.run(["mutmut", "show", k], cwd=tree, env=env, capture_output=True, text=True).stdout
        statuses[k] = "survived\n" + "\n".join(line for line in diff.splitlines()
                                              if line[:1] in "+-" and line[:3] not in ("+++", "---"))
    return statuses


def summarise(name: str, statuses: dict) -> tuple[str, list[str]]:
    counts: dict[str, int] = {}
    for v in statuses.values():
        key = v.split("\n")[0]
        counts[key] = counts.get(key, 0) + 1
    checked = sum(n for k, n in counts.items() if k not in ("not checked", "no tests"))
    killed = counts.get("killed", 0) + counts.get("timeout", 0) + counts.get("segfault", 0)
    rate = f"{100 * killed / checked:.0f}%" if checked else "-"
    row = (f"| {name} | {len(statuses)} | {checked} | {killed} | {counts.get('suspicious', 0)} | "
           f"{counts.get('survived', 0)} | {counts.get('no tests', 0)} | {counts.get('not checked', 0)} | {rate} |")
    survivors = [f"{k}\n{v.split(chr(10), 1)[1]}" for k, v in statuses.items() if v.startswith("survived")]
    return row, survivors


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=25.0, help="time cap of the whole run")
    parser.add_argument("--only", default="", help="comma-separated MODULES keys for mutmut (default: all)")
    parser.add_argument("--no-tool", action="store_true", help="hand-planted mutants only")
    parser.add_argument("--no-hand", action="store_true", help="mutmut only")
    parser.add_argument("--cpp", action="store_true", help="also the C++ mutants (rebuilds the extension)")
    parser.add_argument("--hand", default="", help="only the hand-planted mutants whose name matches this regex")
    parser.add_argument("--children", type=int, default=2, help="mutmut workers")
    parser.add_argument("--workdir", default="", help="scratch folder (default: a new temporary one); a module's "
                        "scratch copy left there by an earlier run is reused, and mutmut goes on where it stopped")
    args = parser.parse_args()
    start = time.time()
    deadline = start + 60 * args.minutes
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ettrl-mutation-"))
    print(f"scratch copies in {work}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    report = ["# Mutation run", "", f"commit {commit.strip()}, cap {args.minutes:g} min", ""]
    if not args.no_hand:
        share = deadline if args.no_tool else start + (deadline - start) * 0.4
        hand = run_hand([m for m in HAND_MUTANTS if re.search(args.hand, m.name)], work, share, args.cpp)
        report += ["## Hand-planted mutants", "", "| mutant | file | result | what |", "|---|---|---|---|"]
        report += [f"| {m.name} | {m.path} | {status} | {m.why} |" for m, status in hand]
        report.append("")
    if not args.no_tool:
        names = [n for n in (args.only.split(",") if args.only else MODULES) if n]
        rows, survivors = [], []
        for i, name in enumerate(names):
            seconds = (deadline - time.time()) / (len(names) - i)
            if seconds < 20:
                rows.append(f"| {name} | not run (time cap) ||||||||")
                continue
            statuses = run_mutmut(name, work, seconds, args.children)
            row, surv = summarise(name, statuses)
            print(row, flush=True)
            rows.append(row)
            survivors += [f"- {name}: {s}" for s in surv]
        header = ("| module | mutants | checked | killed | crashed (suspicious) | survived | no tests "
                  "| not checked (cap) | kill rate |")
        report += ["## mutmut per module", "", header, "|---|---|---|---|---|---|---|---|---|", *rows, "",
                   "### Survivors", "", "```", *survivors, "```"]
    report.append(f"\n{(time.time() - start) / 60:.1f} min")
    text = "\n".join(report)
    (work / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
