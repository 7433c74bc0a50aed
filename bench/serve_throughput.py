"""Throughput of engine.serve over HTTP vs in-process LLM.generate on the same model (default SmolLM2-135M-Instruct).

Three workloads, each run in process and through the server (a `python -m engine.serve` subprocess on
127.0.0.1, no prefix caching on either side so that every run prefills like the first), alternating, median of
--repeats; the ratio is server tok/s / in-process tok/s of the same run:
  1. 64 clients, one streaming request each of n=1 x 128 tokens (64 different chat prompts, ignore_eos); also
     the time to first token (first streamed token) per request, p50 and p99;
  2. n=16 x 4 prompts (4 concurrent requests; the 16 samples of a prompt share its prefill);
  3. one sample_tree request (4 prompts, 4 trees x (1 + 2 forks x 2 branches)) vs LLM.sample_tree.

    python bench/serve_throughput.py [--model NAME] [--dtype bfloat16] [--repeats 3] [--threads N]
"""
import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx
import torch

from engine import LLM, SamplingParams, TreeParams

QUESTION = "Natalia sold clips to {i} of her friends in April, and then she sold half as many clips in May. " \
           "How many clips did Natalia sell altogether in April and May?"
TREE = TreeParams(trees=4, forks=2, branches=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "engine.serve", "--model", args.model, "--dtype", args.dtype, "--port", str(port),
           "--no-prefix-caching", "--log-level", "warning", "--max-num-seqs", "256"]
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
        for r in range(args.repeats):
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
    print("| workload | in-process tok/s | server tok/s | server / in-process |")
    print("|---|---|---|---|")
    names = {"parallel": f"{args.clients} clients x n=1 (streamed)", "n16": "4 prompts x n=16",
             "tree": f"sample_tree 4 prompts x {TREE.trees} x (1 + {TREE.forks} x {TREE.branches})"}
    for key, runs in rows.items():
        local = statistics.median(t / w for (w, t), _ in runs)
        served = statistics.median(t / w for _, (w, t) in runs)
        ratio = statistics.median((t2 / w2) / (t1 / w1) for (w1, t1), (w2, t2) in runs)
        print(f"| {names[key]} | {local:.0f} | {served:.0f} | {ratio:.2f}x |")
    print(f"\ntime to first token over {len(ttfts)} streamed requests: p50 {percentile(ttfts, 0.5) * 1000:.0f} ms, "
          f"p99 {percentile(ttfts, 0.99) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
