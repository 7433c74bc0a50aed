"""Throughput of engine.serve over HTTP vs in-process LLM.generate on the same model (default SmolLM2-135M-Instruct).

Three workloads, each run in process and through the server (a `python -m engine.serve` subprocess on
127.0.0.1, no prefix caching on either side so that every run prefills like the first), alternating, median of
--repeats; the ratio is server tok/s / in-process tok/s of the same run:
  1. 64 clients, one streaming request each of n=1 x 128 tokens (64 different chat prompts, ignore_eos); also
     the time to first token (first streamed token) per request, p50 and p99;
  2. n=16 x 4 prompts (4 concurrent requests; the 16 samples of a prompt share its prefill);
  3. one sample_tree request (4 prompts, 4 trees x (1 + 2 forks x 2 branches)) vs LLM.sample_tree.
Then the long-prompt case (server only): a --long-tokens prompt (4096) is sent, and 0.5 s later a short chat
request; its time to first token is the latency a long prompt adds. Run twice: with nothing else running, and while
--decoders streaming requests decode (their tokens/s in the 3 s before the long prompt against their tokens/s
between its arrival and its first token: how much of their pace the long prefill leaves them).

The server runs with the engine's own defaults for chunked prefill (max_num_batched_tokens as EngineConfig sets it on
the CPU, also passed explicitly so that both sides use the same budget); --server-args adds flags.

    python bench/serve_throughput.py [--model NAME] [--dtype bfloat16] [--repeats 3] [--threads N]
                                     [--long-tokens 4096] [--decoders 8] [--skip-throughput]
"""
import argparse
import asyncio
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time

import httpx
import torch

from engine import LLM, SamplingParams, TreeParams
from engine.config import EngineConfig

QUESTION = "Natalia sold clips to {i} of her friends in April, and then she sold half as many clips in May. " \
           "How many clips did Natalia sell altogether in April and May?"
TREE = TreeParams(trees=4, forks=2, branches=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    budget = EngineConfig(model=args.model, device="cpu").max_num_batched_tokens  # the engine's CPU default
    cmd = [sys.executable, "-m", "engine.serve", "--model", args.model, "--dtype", args.dtype, "--port", str(port),
           "--no-prefix-caching", "--log-level", "warning", "--max-num-seqs", "256",
           "--max-num-batched-tokens", str(budget), *shlex.split(args.server_args)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else None
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit("the server exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not come up")
        time.sleep(0.5)


# ---- in process ---------------------------------------------------------------------------------------------
def in_process_parallel(llm, prompts, n, tokens, seed0) -> tuple[float, int]:
    params = [SamplingParams(n=n, temperature=0.6, max_tokens=tokens, ignore_eos=True, seed=seed0 + i)
              for i in range(len(prompts))]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    return wall, sum(len(o.token_ids) for out in outs for o in out.outputs)


def in_process_tree(llm, prompts, tokens, seed0) -> tuple[float, int]:
    params = [SamplingParams(temperature=0.6, max_tokens=tokens, ignore_eos=True, seed=seed0 + i)
              for i in range(len(prompts))]
    start = time.perf_counter()
    results = llm.sample_tree(prompts, TREE, params)
    return time.perf_counter() - start, sum(r.stats.decoded_tokens for r in results)


# ---- through the server -----------------------------------------------------------------------------------------
async def stream_one(http, prompt, tokens, seed, t0) -> tuple[float, int]:
    """(time to the first streamed token, tokens) of one streaming request."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.6, "seed": seed, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    ttft, count = None, 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            got = sum(len(c.get("token_ids", [])) for c in json.loads(line[6:])["choices"])
            if got and ttft is None:
                ttft = time.perf_counter() - t0
            count += got
    return ttft, count


async def served_parallel(url, prompts, n, tokens, seed0, stream: bool):
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=256)) as http:
        t0 = time.perf_counter()
        if stream:
            results = await asyncio.gather(*[stream_one(http, p, tokens, seed0 + i, t0) for i, p in enumerate(prompts)])
            return time.perf_counter() - t0, sum(c for _, c in results), [t for t, _ in results]
        bodies = [{"prompt": p, "n": n, "max_tokens": tokens, "temperature": 0.6, "seed": seed0 + i,
                   "ignore_eos": True} for i, p in enumerate(prompts)]
        responses = await asyncio.gather(*[http.post("/v1/completions", json=b) for b in bodies])
        wall = time.perf_counter() - t0
        return wall, sum(r.json()["usage"]["completion_tokens"] for r in responses), []


def served_tree(url, prompts, tokens, seed0) -> tuple[float, int]:
    body = {"prompts": prompts, "trees": TREE.trees, "forks": TREE.forks, "branches": TREE.branches,
            "temperature": 0.6, "max_tokens": tokens, "ignore_eos": True, "seed": seed0}
    start = time.perf_counter()
    r = httpx.post(f"{url}/v1/sample_tree", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - start, sum(res["stats"]["decoded_tokens"] for res in r.json()["results"])


# ---- a long prompt among short requests -------------------------------------------------------------------------
async def stream_times(http, body: dict, times: list[float]):
    """Streams one completion, appending the arrival time of each token."""
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True, "return_token_ids": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                now = time.perf_counter()
                times += [now] * sum(len(c.get("token_ids", [])) for c in json.loads(line[6:])["choices"])


def rate(times: list[list[float]], start: float, end: float) -> float:
    """Tokens per second of all streams in [start, end)."""
    return sum(start <= t < end for ts in times for t in ts) / (end - start)


async def long_prompt_case(url: str, long_ids: list[int], short: str, decoders: list[str]) -> dict:
    """A long prompt, and 0.5 s later a short request, while `decoders` stream (none: nothing else runs)."""
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=httpx.Limits(max_connections=64)) as http:
        times = [[] for _ in decoders]
        tasks = [asyncio.create_task(stream_times(http, {"prompt": p, "max_tokens": 4000, "temperature": 0.6,
                                                         "seed": i, "ignore_eos": True}, times[i]))
                 for i, p in enumerate(decoders)]
        result = {}
        if decoders:
            while sum(map(len, times)) < len(decoders) * 8:  # all of them decoding
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            before = time.perf_counter()
            await asyncio.sleep(3.0)
            result["decode_before"] = rate(times, before, time.perf_counter())
        long_times, short_times = [], []
        t_long = time.perf_counter()
        long_task = asyncio.create_task(stream_times(http, {"prompt": long_ids, "max_tokens": 1, "temperature": 0},
                                                     long_times))
        await asyncio.sleep(0.5)
        t_short = time.perf_counter()
        await stream_times(http, {"prompt": short, "max_tokens": 2, "temperature": 0}, short_times)
        await long_task
        result["short_ttft"] = short_times[0] - t_short
        result["long_ttft"] = long_times[0] - t_long
        if decoders:
            result["decode_during"] = rate(times, t_long, long_times[0])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--long-tokens", type=int, default=4096)
    ap.add_argument("--decoders", type=int, default=8)
    ap.add_argument("--skip-throughput", action="store_true", help="only the long-prompt case")
    ap.add_argument("--server-args", default="",
                    help="more engine.serve flags, e.g. '--long-prefill-token-threshold 8'")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    port = free_port()
    server = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    try:
        llm = LLM(args.model, dtype=args.dtype, enable_prefix_caching=False)
        chat = lambda i: llm.apply_chat_template([{"role": "user", "content": QUESTION.format(i=10 + i)}])  # noqa: E731
        many = [chat(i) for i in range(args.clients)]
        few = many[:4]
        in_process_parallel(llm, few, 2, 8, 0)  # warm-up both sides
        asyncio.run(served_parallel(url, few, 2, 8, 0, stream=False))
        rows = {"parallel": [], "n16": [], "tree": []}
        ttfts = []
        long_ids = llm.encode(" ".join(QUESTION.format(i=i) for i in range(args.long_tokens // 30 + 2)))
        long_ids = long_ids[:args.long_tokens]
        long_runs = []
        for r in range(args.repeats):
            alone = asyncio.run(long_prompt_case(url, long_ids, chat(1000 + r), []))
            busy = asyncio.run(long_prompt_case(url, long_ids, chat(2000 + r), many[:args.decoders]))
            long_runs.append((alone, busy))
            print(f"long prompt, repeat {r}: alone {alone}, with {args.decoders} decoding {busy}", flush=True)
        for r in range(0 if args.skip_throughput else args.repeats):
            seed = 1000 * r
            local = in_process_parallel(llm, many, 1, args.new_tokens, seed)
            wall, toks, ttft = asyncio.run(served_parallel(url, many, 1, args.new_tokens, seed, stream=True))
            rows["parallel"].append((local, (wall, toks)))
            ttfts += ttft
            local = in_process_parallel(llm, few, 16, args.new_tokens, seed)
            rows["n16"].append((local, asyncio.run(served_parallel(url, few, 16, args.new_tokens, seed, False))[:2]))
            rows["tree"].append((in_process_tree(llm, few, args.new_tokens, seed),
                                 served_tree(url, few, args.new_tokens, seed)))
            print(f"repeat {r}: " + ", ".join(f"{k} {v[-1][1][1] / v[-1][1][0]:.0f} vs {v[-1][0][1] / v[-1][0][0]:.0f}"
                                              for k, v in rows.items()), flush=True)
    finally:
        server.terminate()
        server.wait(30)
    print(f"\n{args.model} {args.dtype}, {torch.get_num_threads()} threads, {args.new_tokens} new tokens per sample "
          f"(ignore_eos, T=0.6), median of {args.repeats}; server = a python -m engine.serve subprocess on "
          f"127.0.0.1, no prefix caching on either side\n")
    names = {"parallel": f"{args.clients} clients x n=1 (streamed)", "n16": "4 prompts x n=16",
             "tree": f"sample_tree 4 prompts x {TREE.trees} x (1 + {TREE.forks} x {TREE.branches})"}
    if not args.skip_throughput:
        print("| workload | in-process tok/s | server tok/s | server / in-process |")
        print("|---|---|---|---|")
    for key, runs in rows.items() if not args.skip_throughput else ():
        local = statistics.median(t / w for (w, t), _ in runs)
        served = statistics.median(t / w for _, (w, t) in runs)
        ratio = statistics.median((t2 / w2) / (t1 / w1) for (w1, t1), (w2, t2) in runs)
        print(f"| {names[key]} | {local:.0f} | {served:.0f} | {ratio:.2f}x |")
    if ttfts:
        print(f"\ntime to first token over {len(ttfts)} streamed requests: p50 {percentile(ttfts, 0.5) * 1000:.0f} "
              f"ms, p99 {percentile(ttfts, 0.99) * 1000:.0f} ms")
    med = lambda key, i: statistics.median(run[i][key] for run in long_runs)  # noqa: E731
    print(f"\na {len(long_ids)}-token prompt, then 0.5 s later a short chat request (max_tokens 2); median of "
          f"{len(long_runs)}\n")
    print("| running beside it | short request's time to first token s | long prompt's time to first token s "
          "| decoders' tok/s before | during the long prefill | during / before |")
    print("|---|---|---|---|---|---|")
    print(f"| nothing | {med('short_ttft', 0):.2f} | {med('long_ttft', 0):.2f} | - | - | - |")
    print(f"| {args.decoders} streaming requests | {med('short_ttft', 1):.2f} | {med('long_ttft', 1):.2f} | "
          f"{med('decode_before', 1):.0f} | {med('decode_during', 1):.0f} | "
          f"{statistics.median(b['decode_during'] / b['decode_before'] for _, b in long_runs):.2f}x |")


if __name__ == "__main__":
    main()
