"""Benchmark: grouping 64 answers of one problem into equivalence classes (the TTRL vote), on CPU.

Answers are built from MATH-500 gold answers (../shared/data/math500.jsonl): rewritten forms of the gold
(re-spaced, \\dfrac, decimals, "x = ...", units), near-miss distractors (one digit changed), other problems'
answers and None (no box), 64 per problem. Caches are cleared before each problem ("cold"), so every distinct
string is parsed afresh, as in a new training step.

    python bench/grading.py [--problems 100] [--seed 0]
"""
import argparse
import json
import random
import statistics
import time
from pathlib import Path

from ettrl.grading import equivalence, group_answers, numeric
from ettrl.grading.normalize import parse_number

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "math500.jsonl"


def rewrites(gold: str) -> list[str]:
    forms = [gold, gold.replace(" ", ""), " " + gold + " ", gold.replace("\\frac", "\\dfrac"), gold + "."]
    value = parse_number(gold.replace(" ", ""))
    if value is not None:
        forms += [f"x = {gold}", f"{gold} \\text{{ units}}"]
        if value.denominator in (1, 2, 4, 5, 8, 10, 20, 25):
            forms.append(str(float(value)))
        if value.denominator == 1:
            forms.append(f"\\frac{{{2 * value.numerator}}}{{2}}")
    return forms


def near_miss(gold: str, rng: random.Random) -> str:
    digits = [i for i, ch in enumerate(gold) if ch.isdigit()]
    if not digits:
        return gold + "+1"
    i = rng.choice(digits)
    return gold[:i] + str((int(gold[i]) + rng.randint(1, 9)) % 10) + gold[i + 1:]


def make_group(gold: str, others: list[str], rng: random.Random, n: int = 64) -> list[str | None]:
    good = rewrites(gold)
    distractors = [near_miss(gold, rng) for _ in range(6)] + rng.sample(others, 3)
    answers = []
    for _ in range(n):
        u = rng.random()
        answers.append(rng.choice(good) if u < 0.5 else rng.choice(distractors) if u < 0.9 else None)
    return answers


def worst_case_group(n: int = 64) -> list[str]:
    """64 pairwise-different symbolic answers: every pair goes to the symbolic check."""
    return [f"{i}\\sqrt{{{i + 2}}} + \\frac{{\\pi}}{{{i + 3}}}" for i in range(1, n + 1)]


def time_group(answers) -> tuple[float, float]:
    """(CPU seconds, wall seconds) to group `answers` with cold caches. CPU time is the number to read on a
    machine whose cores are shared; wall time also counts waiting for them."""
    equivalence._parse.cache_clear()
    numeric._value.cache_clear()
    equivalence._TIMED_OUT.clear()
    cpu, wall = time.process_time(), time.perf_counter()
    group_answers(answers)
    return time.process_time() - cpu, time.perf_counter() - wall


def summary(seconds: list[float]) -> str:
    ms = sorted(1000 * t for t in seconds)
    return (f"mean {statistics.mean(ms):.1f} ms, median {statistics.median(ms):.1f} ms, "
            f"p95 {ms[int(0.95 * (len(ms) - 1))]:.1f} ms, max {ms[-1]:.1f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not DATA.exists():
        raise SystemExit(f"benchmark data not found at {DATA}")
    golds = [json.loads(line)["answer"] for line in DATA.read_text().splitlines()]
    rng = random.Random(args.seed)
    group_answers(["1", "2\\sqrt{3}", "\\sqrt{12}"])  # import and warm up once, as a long-running trainer would
    picked = rng.sample(range(len(golds)), min(args.problems, len(golds)))
    times = [time_group(make_group(golds[i], golds, rng)) for i in picked]
    print(f"{len(times)} problems x 64 answers, cold caches")
    print(f"  CPU:  {summary([cpu for cpu, _ in times])}")
    print(f"  wall: {summary([wall for _, wall in times])}")
    cpu, wall = time_group(worst_case_group())
    print(f"  worst case, 64 distinct symbolic answers ({64 * 63 // 2} pairs): CPU {1000 * cpu:.0f} ms, "
          f"wall {1000 * wall:.0f} ms")

if __name__ == "__main__":
    main()
