"""Cost per generated token of stopping on text (stop strings and stop_regex), early and late in a long response.

The engine decodes only the newest tokens each step and streams the new characters through the stop patterns'
automaton (engine/stop_checker.py), so the cost of a step should not grow with the response. This feeds a
3,072-token response one token at a time, as the engine does, and reports the median microseconds per step in
its first and last 256 tokens, beside a naive check (decode the whole response and `re.search` it every step).

    python bench/stop_matching.py                       # the default model's tokenizer, the boxed-answer pattern
    python bench/stop_matching.py --tokens 3072 --pattern '\\\\boxed\\{[^{}]*\\}'
"""
from __future__ import annotations

import argparse
import re
import statistics
import time

from transformers import AutoTokenizer

from engine.model_files import resolve_model
from engine.stop_checker import TextStop
from engine.stop_regex import compile_stop_patterns

BOXED = r"\\boxed\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\}"
REASONING = ("Let x be the number of apples. Then 3x + 7 = 25, so 3x = 18 and x = 6. We check: 3 * 6 + 7 = 25. "
             "The fraction \\frac{1}{2} of 6 is 3; adding { and } inside text does not close a box. ")


def run(tokenizer, ids: list[int], pattern: str, naive: bool, window: int) -> tuple[float, float]:
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    compiled = re.compile(pattern)
    stop = TextStop(compile_stop_patterns((), (pattern,)), decode, 0)
    grown: list[int] = []
    times = []
    for token in ids:
        grown.append(token)
        start = time.perf_counter()
        hit = bool(compiled.search(decode(grown))) if naive else stop.step(grown)
        times.append(time.perf_counter() - start)
        assert not hit, "the benchmark text must not complete the pattern"
    return 1e6 * statistics.median(times[:window]), 1e6 * statistics.median(times[-window:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer decodes")
    ap.add_argument("--tokens", type=int, default=3072)
    ap.add_argument("--pattern", default=BOXED)
    ap.add_argument("--window", type=int, default=256, help="tokens at each end whose median is reported")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(args.model)))
    ids: list[int] = []
    while len(ids) < args.tokens:
        ids += tokenizer.encode(REASONING, add_special_tokens=False)
    ids = ids[:args.tokens]
    print(f"{args.tokens} tokens, pattern {args.pattern!r}; median us per step over the first / last "
          f"{args.window} tokens, median of {args.repeats} passes")
    print("| check | first tokens (us/step) | last tokens (us/step) | last / first |")
    print("|---|---:|---:|---:|")
    for name, naive in (("engine (incremental text + automaton)", False), ("naive (decode all + re.search)", True)):
        runs = [run(tokenizer, ids, args.pattern, naive, args.window) for _ in range(args.repeats)]
        first, last = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        print(f"| {name} | {first:.1f} | {last:.1f} | {last / first:.2f} |")


if __name__ == "__main__":
    main()
