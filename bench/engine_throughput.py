"""Decode and prefill throughput of the engine vs transformers on the default model (SmolLM2-135M-Instruct).

For each dtype and batch size b: b samples x 128 new tokens of one chat prompt (T=0.6), the same prompt for both,
median of 3 runs; tok/s counts generated tokens over wall time (prefill included), and the ratio is also given
in process CPU time, which a machine shared with other jobs distorts less. The floor is the roofline of
bench/roofline.py: per decode step, max(matmul FLOPs at this machine's measured matmul rate, weight + KV bytes at
its measured memory bandwidth); "engine / floor" is the engine's tok/s as a share of it. The CPU model and its
features head the output.
The engine runs without prefix caching so that every run prefills its prompt like transformers does.
Both run in this one process, one after the other, so the ratio is fair even on a shared machine.

Prefill rows: one prompt of n tokens (--prefill-lengths) through the engine with its defaults (chunked prefill
included; max_tokens=1, so its time is the prompt's prefill and one sampled token) against one transformers forward
of the same ids with logits_to_keep=1 (what generate's prefill computes), alternating, median of --repeats; the
floor is bench/roofline.py's prefill_seconds (the layers' matmuls for every token, the lm_head for the last, q.k and
p.v over the causal half of the key pairs, at the measured matmul rate).

    python bench/engine_throughput.py [--batches 1 8 64] [--dtypes float32 bfloat16] [--repeats 3] [--threads N]
                                      [--prefill-lengths 512 2048 4096 | --prefill-lengths] [--new-tokens 128]
"""
import argparse
import statistics
import time

import torch
from roofline import (  # bench/
    floor_tokens_per_s,
    machine_header,
    matmul_gflops,
    memory_gbps,
    model_sizes,
    prefill_seconds,
)

from engine import LLM, SamplingParams

PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May? Put the answer in \\boxed{}.")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timed(fn, tokens: int) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process): CPU time is robust to a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)


def median_pair(runs):
    runs = list(runs)
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def time_engine(llm: LLM, ids: list[int], batch: int, new_tokens: int, seed: int) -> tuple[float, float]:
    params = SamplingParams(n=batch, temperature=0.6, max_tokens=new_tokens, ignore_eos=True, seed=seed)
    def run():
        outs = llm.generate([ids], params)
        assert sum(len(o.token_ids) for o in outs[0].outputs) == batch * new_tokens
    return timed(run, batch * new_tokens)


@torch.inference_mode()
def time_transformers(model, ids: list[int], batch: int, new_tokens: int, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    input_ids = torch.tensor([ids] * batch)
    def run():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, temperature=0.6,
                             top_p=1.0, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        assert out.shape[1] - len(ids) == new_tokens
    return timed(run, batch * new_tokens)


def prefill_ids(llm: LLM, n: int) -> list[int]:
    """n token ids of chat text (the question repeated), the same for both sides."""
    text = " ".join(PROMPT for _ in range(n // 30 + 2))
    return llm.encode(text)[:n]


def time_prefill(llm: LLM, hf, ids: list[int], repeats: int) -> tuple[float, float]:
    """(engine seconds, transformers seconds) of one prefill of ids, medians of alternating runs."""
    params = SamplingParams(max_tokens=1, temperature=0)
    x = torch.tensor([ids])

    def engine():
        start = time.perf_counter()
        llm.generate([ids], params)
        return time.perf_counter() - start

    @torch.inference_mode()
    def transformers():
        start = time.perf_counter()
        hf(x, logits_to_keep=1)
        return time.perf_counter() - start
    engine(), hf is not None and transformers()  # warm-up at this length
    runs = [(engine(), transformers() if hf is not None else float("nan")) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 64], help="decode rows (none: skip them)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--prefill-lengths", type=int, nargs="*", default=[512, 2048, 4096],
                    help="prompt lengths of the prefill rows (none: skip them)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    gbps = memory_gbps()
    print(machine_header(), flush=True)
    print(f"memory bandwidth (copy): {gbps:.1f} GB/s", flush=True)
    rows, prefill_rows = [], []
    for dtype in args.dtypes:
        llm = LLM(args.model, dtype=dtype, enable_prefix_caching=False, kv_cache_tokens=64 * 512)
        ids = llm.encode(llm.apply_chat_template([{"role": "user", "content": PROMPT}]))
        hf = None if args.skip_transformers else AutoModelForCausalLM.from_pretrained(
            llm.model_dir, dtype=DTYPES[dtype]).eval()
        gflops, sizes = matmul_gflops(DTYPES[dtype]), model_sizes(llm.engine.runner.model)
        print(f"{dtype}: matmul {gflops:.0f} GFLOP/s (best of torch 2048^3 and panel_linear), engine matmul kernel "
              f"{llm.engine.runner.matmul_kernel}", flush=True)
        time_engine(llm, ids, 4, 8, seed=0)  # warm-up
        for batch in args.batches:
            eng = median_pair(time_engine(llm, ids, batch, args.new_tokens, r) for r in range(args.repeats))
            print(f"{dtype} batch {batch}: engine {eng[0]:.0f} tok/s ({eng[1]:.0f} per CPU s)", flush=True)
            ref = (None, None) if hf is None else median_pair(
                time_transformers(hf, ids, batch, args.new_tokens, r) for r in range(args.repeats))
            print(f"{dtype} batch {batch}: transformers {ref[0] or float('nan'):.0f} tok/s", flush=True)
            floor = floor_tokens_per_s(sizes, DTYPES[dtype], batch, len(ids), args.new_tokens, gflops, gbps,
                                       distinct_prompts=1)
            rows.append((dtype, batch, ref, eng, floor))
        for n in args.prefill_lengths:
            prompt = prefill_ids(llm, n)
            eng_s, ref_s = time_prefill(llm, hf, prompt, args.repeats)
            floor_s = prefill_seconds(sizes, DTYPES[dtype], len(prompt), gflops, gbps)
            print(f"{dtype} prefill {len(prompt)}: engine {eng_s:.2f} s, transformers {ref_s:.2f} s, floor "
                  f"{floor_s:.2f} s", flush=True)
            prefill_rows.append((dtype, len(prompt), eng_s, ref_s, floor_s))
        del llm, hf
    if rows:
        print(f"\nprompt {len(ids)} tokens, {args.new_tokens} new tokens per sample, T=0.6, median of {args.repeats}, "
              f"{torch.get_num_threads()} threads\n")
        print("| dtype | batch | transformers tok/s | engine tok/s | engine / transformers (wall) "
              "| engine / transformers (CPU time) | roofline floor tok/s | engine / floor |")
        print("|---|---|---|---|---|---|---|---|")
    for dtype, batch, ref, eng, floor in rows:
        wall = f"{eng[0] / ref[0]:.1f}x" if ref[0] else "-"
        cpu = f"{eng[1] / ref[1]:.1f}x" if ref[1] else "-"
        print(f"| {dtype} | {batch} | {ref[0] or float('nan'):.0f} | {eng[0]:.0f} | {wall} | {cpu} | {floor:.0f} | "
              f"{100 * eng[0] / floor:.0f}% |")
    if prefill_rows:
        print(f"\none prompt's prefill (engine defaults: chunked prefill, max_num_batched_tokens and "
              f"long_prefill_token_threshold as EngineConfig sets them on this device), median of {args.repeats}\n")
        print("| dtype | prompt tokens | transformers forward s | engine s | engine tok/s | engine / transformers "
              "| floor s | floor / engine |")
        print("|---|---|---|---|---|---|---|---|")
        for dtype, n, eng_s, ref_s, floor_s in prefill_rows:
            print(f"| {dtype} | {n} | {ref_s:.2f} | {eng_s:.2f} | {n / eng_s:.0f} | {ref_s / eng_s:.2f}x | "
                  f"{floor_s:.2f} | {100 * floor_s / eng_s:.0f}% |")


if __name__ == "__main__":
    main()
