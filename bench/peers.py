"""The engine beside its peers: the same model, prompts and token counts through transformers, CTranslate2,
llama.cpp (llama-cpp-python) and ONNX Runtime GenAI.

Each run is its own process (`--worker NAME`: load, a short warm-up, then one timed generation of `batch` distinct
prompts x `new_tokens` tokens at T=0.6, EOS ignored; tok/s = generated tokens / wall time of that generation,
prefill included; also per CPU second of the process, which other jobs on a shared machine distort less as long
as no runtime spins on idle threads: use --threads 1 there). Rounds alternate the engine with each peer (engine,
peer A, engine, peer B, ...), `--repeats` rounds; each peer's ratio is the median of the engine runs next to it
over the peer's median, so load from other jobs on a shared machine hits both sides alike. Peers are optional:
one that is not installed, or cannot run this dtype, is skipped with a message. Converted models (CTranslate2,
ONNX) are built once into <cache dir>/peers/ (ETTRL_CACHE).

llama.cpp: `pip install llama-cpp-python` (builds llama.cpp from source, ~10 min on 2 cores). It reads a GGUF:
--gguf (default: the Q4_1 GGUF the default model is converted from; for F32/BF16 convert our safetensors with
llama.cpp's convert_hf_to_gguf.py --outtype f32|bf16). llama-cpp-python's high-level API decodes one sequence
at a time, so at batch > 1 it runs the prompts one after another; ONNX Runtime GenAI's CPU sampler takes at most
32 rows, so a batch of 64 runs as two batches of 32, one after the other.

    python bench/peers.py [--batch 8] [--dtype float32] [--new-tokens 128] [--repeats 3] [--peers ...]
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PEERS = ("transformers", "ctranslate2", "llama_cpp", "onnxruntime_genai")
ORT_MAX_BATCH = 32  # onnxruntime-genai 0.18 on the CPU: "batch_size (64) must be in [1, 32]"
SKIP = 3  # a worker's exit status for "this peer is not available here"
QUESTION = " How many clips did Natalia sell altogether in April and May if she sold 48 in April and half as many"


class Skip(Exception):
    pass


def prompts(tokenizer, batch: int, length: int = 15) -> list[list[int]]:
    """`batch` distinct prompts of exactly `length` token ids."""
    out = []
    for i in range(batch):
        ids = tokenizer.encode(f"Question {i}:{QUESTION}", add_special_tokens=False)[:length]
        if len(ids) < length:
            raise ValueError(f"prompt {i} has {len(ids)} < {length} tokens")
        out.append(ids)
    return out


def peer_dir(name: str, dtype: str) -> Path:
    from engine.model_files import default_cache_dir
    return default_cache_dir() / "peers" / f"{name}-{dtype}"


# Each runner: (model_dir, prompts, new_tokens, dtype, threads, args) -> a callable that generates and returns the
# number of generated tokens. Loading and conversion happen before the callable is timed.

def engine_runner(model_dir, ids, new_tokens, dtype, threads, args):
    from engine import LLM, SamplingParams
    llm = LLM(model_dir, dtype=dtype, enable_prefix_caching=False, kv_cache_tokens=len(ids) * 512)
    seed = iter(range(1000))

    def run(max_tokens=new_tokens):
        params = SamplingParams(temperature=0.6, max_tokens=max_tokens, ignore_eos=True, seed=next(seed))
        return sum(len(o.outputs[0].token_ids) for o in llm.generate(ids, params))
    return run


def transformers_runner(model_dir, ids, new_tokens, dtype, threads, args):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    input_ids = torch.tensor(ids)

    @torch.inference_mode()
    def run(max_tokens=new_tokens):
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, temperature=0.6,
                             top_p=1.0, top_k=0, max_new_tokens=max_tokens, min_new_tokens=max_tokens)
        return (out.shape[1] - input_ids.shape[1]) * out.shape[0]
    return run


def ctranslate2_runner(model_dir, ids, new_tokens, dtype, threads, args):
    try:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter
    except ImportError as e:
        raise Skip(f"ctranslate2 is not installed ({e}): pip install ctranslate2") from e
    supported = sorted(ctranslate2.get_supported_compute_types("cpu"))
    if dtype not in supported:  # it would silently compute in another type
        raise Skip(f"CTranslate2 has no {dtype} on this CPU (it has {supported})")
    out = peer_dir("ctranslate2", "float32")
    if not (out / "model.bin").exists():
        TransformersConverter(str(model_dir)).convert(str(out), quantization="float32", force=True)
    gen = ctranslate2.Generator(str(out), device="cpu", compute_type=dtype, intra_threads=threads)
    from transformers import AutoTokenizer
    tokens = [AutoTokenizer.from_pretrained(model_dir).convert_ids_to_tokens(p) for p in ids]

    def run(max_tokens=new_tokens):
        results = gen.generate_batch(tokens, max_length=max_tokens, min_length=max_tokens, sampling_topk=0,
                                     sampling_temperature=0.6, include_prompt_in_result=False)
        return sum(len(r.sequences_ids[0]) for r in results)
    return run


def llama_cpp_runner(model_dir, ids, new_tokens, dtype, threads, args):
    try:
        import llama_cpp
    except ImportError as e:
        raise Skip(f"llama-cpp-python is not installed ({e}): pip install llama-cpp-python (builds llama.cpp)") from e
    from engine.gguf_convert import GGUF_NAME
    from engine.model_files import default_cache_dir
    gguf = Path(args.gguf) if args.gguf else default_cache_dir() / "gguf" / GGUF_NAME
    if not gguf.exists():
        raise Skip(f"no GGUF at {gguf} (--gguf)")
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(ids[0]) + new_tokens + 8, n_threads=threads,
                          n_batch=64, verbose=False)

    def run(max_tokens=new_tokens):
        count = 0
        for p in ids:
            llm.reset()
            for _, _ in zip(range(max_tokens), llm.generate(p, temp=0.6, top_k=0, top_p=1.0, min_p=0.0)):
                count += 1
        return count
    return run


def onnxruntime_genai_runner(model_dir, ids, new_tokens, dtype, threads, args):
    try:
        import numpy as np
        import onnxruntime_genai as og
    except ImportError as e:
        raise Skip(f"onnxruntime-genai is not installed ({e}): pip install onnxruntime-genai onnx onnx-ir") from e
    if dtype != "float32":
        raise Skip("ONNX Runtime GenAI's model builder makes fp32 (or int4) CPU models, not bf16")
    out = peer_dir("onnxruntime_genai", dtype)
    if not (out / "genai_config.json").exists():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o",
                        str(out), "-p", "fp32", "-e", "cpu"], check=True, capture_output=True)
    config = json.loads((out / "genai_config.json").read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    (out / "genai_config.json").write_text(json.dumps(config, indent=2))
    model = og.Model(str(out))
    vocab = config["model"]["vocab_size"]

    def run_chunk(chunk, max_tokens):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=True, temperature=0.6, top_k=vocab, top_p=1.0, batch_size=len(chunk),
                                  max_length=len(chunk[0]) + max_tokens, min_length=len(chunk[0]) + max_tokens)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array(chunk, dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        return sum(len(generator.get_sequence(i)) - len(p) for i, p in enumerate(chunk))

    def run(max_tokens=new_tokens):  # its CPU sampler takes at most ORT_MAX_BATCH rows: larger batches in turns
        return sum(run_chunk(ids[i:i + ORT_MAX_BATCH], max_tokens) for i in range(0, len(ids), ORT_MAX_BATCH))
    return run


RUNNERS = {"engine": engine_runner, "transformers": transformers_runner, "ctranslate2": ctranslate2_runner,
           "llama_cpp": llama_cpp_runner, "onnxruntime_genai": onnxruntime_genai_runner}


def worker(args):
    import torch
    torch.set_num_threads(args.threads)
    from engine import resolve_model
    model_dir = resolve_model(args.model)
    from transformers import AutoTokenizer
    ids = prompts(AutoTokenizer.from_pretrained(model_dir), args.batch)
    try:
        run = RUNNERS[args.worker](model_dir, ids, args.new_tokens, args.dtype, args.threads, args)
    except Skip as e:
        print(f"SKIP {e}", flush=True)
        sys.exit(SKIP)
    run(8)  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    tokens = run()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    print("RESULT " + json.dumps({"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu_seconds}), flush=True)


def spawn(name: str, args) -> tuple[float, float] | str:
    """(tok/s, tok per CPU second) of one worker run, or the reason it was skipped."""
    cmd = [sys.executable, __file__, "--worker", name, "--model", args.model, "--batch", str(args.batch),
           "--dtype", args.dtype, "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    if args.gguf:
        cmd += ["--gguf", args.gguf]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = proc.stdout.splitlines()
    skipped = [line[5:] for line in lines if line.startswith("SKIP ")]
    if proc.returncode == SKIP and skipped:
        return skipped[0]
    results = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
    if proc.returncode or not results:
        return f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:] or proc.stdout[-300:]}"
    r = results[0]
    expected = args.batch * args.new_tokens
    if r["tokens"] != expected:
        return f"generated {r['tokens']} tokens, not {expected}"
    return r["tokens"] / r["seconds"], r["tokens"] / r["cpu_seconds"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    ap.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: torch's)")
    ap.add_argument("--gguf", default=None, help="llama.cpp's model file (default: the default model's Q4_1)")
    ap.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch
    if args.threads is None:
        args.threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # the header reports it
    if args.worker:
        return worker(args)
    from roofline import machine_header  # bench/: the script's own folder is on sys.path
    print(machine_header())
    print(f"{args.model}, {args.dtype}, batch {args.batch} distinct 15-token prompts, {args.new_tokens} new tokens, "
          f"T=0.6, {args.threads} threads, median of {args.repeats}, each run its own process", flush=True)
    peers, engine, runs = list(args.peers), {p: [] for p in args.peers}, {p: [] for p in args.peers}
    for r in range(args.repeats):
        for peer in list(peers):
            result = spawn(peer, args)
            if isinstance(result, str):
                print(f"{peer}: skipped: {result}", flush=True)
                peers.remove(peer)
                continue
            runs[peer].append(result)
            engine[peer].append(spawn("engine", args))
            if isinstance(engine[peer][-1], str):
                sys.exit(f"engine: {engine[peer][-1]}")
            print(f"round {r}: {peer} {result[0]:.1f} tok/s ({result[1]:.1f} per CPU s), engine "
                  f"{engine[peer][-1][0]:.1f} ({engine[peer][-1][1]:.1f})", flush=True)
    print(f"\n| peer ({args.dtype}, batch {args.batch}, {args.threads} threads) | peer tok/s | engine tok/s (runs "
          f"beside it) | engine / peer (wall) | engine / peer (CPU time) |\n|---|---|---|---|---|")
    for peer in peers:
        p, e = [[statistics.median(r[i] for r in runs_) for i in (0, 1)] for runs_ in (runs[peer], engine[peer])]
        print(f"| {peer} | {p[0]:.1f} | {e[0]:.1f} | {e[0] / p[0]:.2f}x | {e[1] / p[1]:.2f}x |")


if __name__ == "__main__":
    main()
