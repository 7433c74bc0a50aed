"""One prepared check of the CUDA path: correctness and speed of what matters, in one run.

    python bench/gpu_check.py --out gpu_check            # one H100 / H200, no network: about 5 minutes
    python bench/gpu_check.py --dry-run --out /tmp/gc    # CPU: tiny shapes, Triton interpreter, about a minute

It starts from a bare clone with only torch and transformers installed: the repository and kernels/ go first on
its path, and engine._C is built in place (one compiler call) when missing, or it exits with one line saying why.
tools/gpu_device_run.py runs it on a lent GPU machine (carried wheels, CUDA-marked tests, a time budget).

Sections, each timed and written (results.json, results.md under --out) as soon as it ends, so a run that is cut
off still leaves what it measured; a failing section records its error and the next one runs:
  env            torch / Triton / flashinfer versions, device
  sampling       entropy_sample: Triton vs torch on the GPU vs torch on the CPU (same tokens), GB/s, fp32 and bf16;
                 rows with greedy, top-k, top-p and an excluded token mixed in one batch
  invariance     a row alone vs in a batch, bitwise: the sampler (Triton, torch), flashinfer decode (head_dim 64
                 and 128, keys past the 2048-token split), and the engine's greedy tokens and log-probabilities
  attention      flashinfer vs the torch paged attention vs a dense fp64 reference, keys in scattered blocks:
                 decode past the 2048-token split, prefill over a cached prefix, head_dim 64 and 128
  greedy_*       engine greedy vs transformers on the same device, random models with the shapes of SmolLM2-135M,
                 Qwen2.5-0.5B and Qwen2.5-Math-1.5B (no download), bf16 (flashinfer) and fp32 (torch attention)
  memory         what the engine holds against gpu_memory_utilization (weights, KV pool, activation estimate)
  sleep          sleep(level=2) gives back the pool and the weights; wake_up(["weights"]), then ["kv_cache"]:
                 the same greedy tokens as before
  token_stats    forward and backward: Triton vs torch (same values), GB/s
  sample_tree    tree rollouts with check_integrity after every step
  throughput     engine (parallel and tree) vs transformers generate at batch 64 and 256
  trainer        two trainer steps with the engine asleep during each update
flashinfer's first use JIT-compiles for minutes unless its modules are carried (tools/flashinfer_aot.py): a
background process loads or builds them first, while the torch-path sections run.
"""
import argparse
import gc
import importlib.machinery
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE_SOURCES = ["csrc/bindings_engine.cpp", "csrc/block_allocator.cpp", "csrc/radix_tree.cpp"]  # as setup.py


# ---- a bare clone: the path and engine._C ----------------------------------------------------------------------
def bootstrap() -> None:
    """This checkout first on the path (before any installed copy), and engine._C built in place when missing."""
    for path in (ROOT / "kernels", ROOT):
        if str(path) in sys.path:
            sys.path.remove(str(path))
        sys.path.insert(0, str(path))
    built = [ROOT / "engine" / f"_C{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    if not any(path.exists() for path in built):
        build_engine_extension()


def build_engine_extension() -> Path:
    """engine._C (the KV block allocator and radix tree) with one compiler call, pybind11's headers from the
    pybind11 package or from torch's include folder (torch bundles them). Exits with one line on failure."""
    target = ROOT / "engine" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    python_include = sysconfig.get_paths()["include"]
    if not (Path(python_include) / "Python.h").exists():
        sys.exit(f"gpu_check: engine._C is not built and this Python has no headers ({python_include}/Python.h) to "
                 f"build it: install them (python3-dev) or build elsewhere with `python setup.py build_ext --inplace`")
    compiler = os.environ.get("CXX", "c++")
    temporary = target.with_suffix(".tmp")
    command = [compiler, "-O2", "-shared", "-fPIC", "-std=c++17", f"-I{pybind11_include()}", f"-I{python_include}",
               *[str(ROOT / source) for source in ENGINE_SOURCES], "-o", str(temporary)]
    t0 = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        sys.exit(f"gpu_check: engine._C is not built and `{compiler}` could not build it ({e}): build it with "
                 f"`python setup.py build_ext --inplace`")
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"gpu_check: engine._C is not built and `{compiler}` failed to build it ({last}): build it with "
                 f"`python setup.py build_ext --inplace`")
    temporary.replace(target)
    print(f"built {target.relative_to(ROOT)} in {time.perf_counter() - t0:.0f} s", flush=True)
    return target


def pybind11_include() -> str:
    try:
        import pybind11
        return pybind11.get_include()
    except ImportError:
        import torch
        return str(Path(torch.__file__).parent / "include")


SHAPES = {  # name -> transformers config of the real model (random weights here)
    "smollm2-135m": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
        "rope_theta": 100000.0, "max_position_embeddings": 8192},
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
        "rope_theta": 1000000.0, "max_position_embeddings": 32768},
    "qwen2.5-math-1.5b": {
        "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
        "rope_theta": 10000.0, "max_position_embeddings": 4096},
}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 512,
        "max_position_embeddings": 512}


class Report:
    """Sections as they finish, written to results.json and results.md after each one."""

    def __init__(self, out: Path, args):
        self.out, self.sections, self.started = out, [], time.time()
        self.meta = {"dry_run": args.dry_run, "argv": sys.argv[1:]}
        out.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, fn, *args):
        t0 = time.perf_counter()
        section = {"name": name, "status": "ok", "rows": []}
        try:
            result = fn(*args)
            if isinstance(result, str):  # a reason to skip
                section.update(status="skip", reason=result)
            else:
                section["rows"] = result or []
                if any(row.get("ok") is False for row in section["rows"]):
                    section["status"] = "fail"
        except Exception as e:  # noqa: BLE001 - record it and go on with the next section
            section.update(status="error", error=f"{type(e).__name__}: {e}",
                           traceback=traceback.format_exc()[-4000:])
        section["seconds"] = round(time.perf_counter() - t0, 2)
        self.sections.append(section)
        self.write()
        print(f"[{section['seconds']:7.1f} s] {name}: {section['status']} {section.get('reason', '')}"
              f"{section.get('error', '')}", flush=True)
        return section

    def write(self):
        data = {**self.meta, "elapsed_s": round(time.time() - self.started, 1), "sections": self.sections}
        (self.out / "results.json").write_text(json.dumps(data, indent=1, default=str))
        (self.out / "results.md").write_text(markdown(data))


def markdown(data) -> str:
    lines = [f"# GPU check ({'dry run, CPU' if data['dry_run'] else 'GPU'}), {data['elapsed_s']} s", ""]
    for s in data["sections"]:
        lines.append(f"## {s['name']}: {s['status']} ({s['seconds']} s)")
        if s.get("reason") or s.get("error"):
            lines.append("")
            lines.append(f"    {s.get('reason') or s.get('error')}")
        if s["rows"]:
            keys = list(dict.fromkeys(k for row in s["rows"] for k in row))
            lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |" for row in s["rows"]]
        lines.append("")
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---- helpers ---------------------------------------------------------------------------------------------------
def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_s(fn, device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_in_use(device) -> int:
    """Bytes the GPU allocator holds, or this process's resident size on the CPU."""
    import torch
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def free_memory():
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def byte_tokenizer():
    """Byte-level tokenizer (ids 0..255 bytes, 256 <eos>, 257 <pad>): no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<|endoftext|>": 256, "<|pad|>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def random_model(shape: dict, directory: Path, seed: int = 0, tokenizer: bool = False):
    """Saves a randomly initialised model of `shape` (transformers config fields) in `directory`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    fields = dict(shape)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, bos_token_id=None, eos_token_id=None,
                                  pad_token_id=None)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 1.5B on the CPU takes long
        model = AutoModelForCausalLM.from_config(config).float().eval()
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer:
        byte_tokenizer().save_pretrained(directory)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def shapes(args) -> dict:
    if not args.dry_run:
        return SHAPES
    return {name: {**shape, **TINY, "num_attention_heads": shape["num_attention_heads"],
                   "num_key_value_heads": shape["num_key_value_heads"],
                   "hidden_size": 16 * shape["num_attention_heads"]} for name, shape in SHAPES.items()}


# ---- sections --------------------------------------------------------------------------------------------------
def section_env(args, device):
    import importlib.metadata

    import torch
    row = {"torch": torch.__version__, "device": str(device), "dry_run": args.dry_run}
    for dist in ("triton", "flashinfer-python", "transformers"):
        try:
            row[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            row[dist] = "absent"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        row.update(gpu=props.name, sm=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                   sms=props.multi_processor_count)
    from engine.attention.flashinfer import flashinfer_usable
    row["flashinfer_usable"] = flashinfer_usable(device, torch.bfloat16)[1] or "yes"
    return [row]


def spiky_logits(batch: int, vocab: int, dtype, device, seed: int = 0):
    """Random logits with a few high spikes per row (a peaked distribution, as a model's)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=gen) * 2
    spikes = torch.randint(0, vocab, (batch, 32), generator=gen)
    logits.scatter_add_(1, spikes, torch.rand(batch, 32, generator=gen) * 10 + 14)
    return logits.to(device, dtype)


def mixed_params(batch: int, vocab: int, device) -> dict:
    """Per-row sampling parameters that take every path of the sampler in one batch: greedy and T = 1 rows, top-k
    (20 and 1), top-p (0.9 and 0.5), an excluded token, and plain rows."""
    import torch
    gen = torch.Generator().manual_seed(1)
    temperature = torch.full((batch,), 0.6)
    temperature[0::8], temperature[1::8] = 0.0, 1.0
    top_k = torch.full((batch,), -1, dtype=torch.int64)
    top_k[2::8], top_k[3::8] = 20, 1
    top_p = torch.ones(batch)
    top_p[4::8], top_p[5::8] = 0.9, 0.5
    exclude = torch.full((batch,), -1, dtype=torch.int64)
    exclude[6::8] = torch.randint(0, vocab, (len(exclude[6::8]),), generator=gen)
    return {"temperature": temperature.to(device), "top_k": top_k.to(device), "top_p": top_p.to(device),
            "exclude": exclude.to(device), "seeds": 7, "seq_ids": (torch.arange(batch) * 3 + 1).to(device),
            "positions": (torch.arange(batch) + 100).to(device)}


def row_params(params: dict, rows) -> dict:
    """The parameters of some rows (per-row tensors indexed, scalars kept)."""
    import torch
    return {k: v[rows] if torch.is_tensor(v) and v.dim() else v for k, v in params.items()}


def section_sampling(args, device):
    import torch

    import ettrl_kernels
    batch, vocab = (16, 1000) if args.dry_run else (64, 151936)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        logits = spiky_logits(batch, vocab, dtype, device)
        plain = {"temperature": 0.6, "seeds": 3, "seq_ids": torch.arange(batch, device=device), "positions": 9}
        for case, keys in (("T=0.6", plain), ("mixed rows", mixed_params(batch, vocab, device))):
            cpu_keys = {k: v.cpu() if torch.is_tensor(v) else v for k, v in keys.items()}
            ref = ettrl_kernels.entropy_sample(logits.cpu(), backend="torch", **cpu_keys)
            for backend in ("triton", "torch"):
                def fn(logits=logits, keys=keys, backend=backend):
                    return ettrl_kernels.entropy_sample(logits, backend=backend, **keys)

                tokens, logprobs, entropies = fn()
                seconds = median_s(fn, device, args.repeats)
                same = torch.equal(tokens.cpu(), ref[0])
                rows.append({"dtype": str(dtype).split(".")[-1], "rows": case, "path": f"{backend} (same device)",
                             "shape": f"{batch}x{vocab}", "same_tokens_as_cpu": same,
                             "max_logprob_diff": float((logprobs.cpu() - ref[1]).abs().max()),
                             "max_entropy_diff": float((entropies.cpu() - ref[2]).abs().max()),
                             "ms": seconds * 1e3, "GB/s": logits.numel() * logits.element_size() / seconds / 1e9,
                             "ok": same})
        cpu_logits, cpu_keys = logits.cpu(), {**plain, "seq_ids": plain["seq_ids"].cpu()}
        seconds = median_s(lambda x=cpu_logits, k=cpu_keys: ettrl_kernels.entropy_sample(x, **k), torch.device("cpu"),
                           max(1, args.repeats // 2))
        rows.append({"dtype": str(dtype).split(".")[-1], "rows": "T=0.6", "path": "cpu (auto: C++ or torch)",
                     "shape": f"{batch}x{vocab}",
                     "ms": seconds * 1e3, "GB/s": cpu_logits.numel() * cpu_logits.element_size() / seconds / 1e9})
    return rows


def section_invariance(args, device, tmp: Path):
    """A row alone vs in a batch, bitwise: the sampler, flashinfer decode, and the engine (tokens, logprobs)."""
    return [*sampler_invariance(args, device), *decode_invariance(args, device), *engine_invariance(args, device, tmp)]


def sampler_invariance(args, device) -> list[dict]:
    import torch

    import ettrl_kernels
    batch, vocab = (16, 1000) if args.dry_run else (256, 151936)
    logits = spiky_logits(batch, vocab, torch.bfloat16, device, seed=2)
    keys = mixed_params(batch, vocab, device)
    picked = [0, 2, 4, 6, 9, batch - 1]  # greedy, top-k, top-p, excluded token, plain rows
    rows = []
    for backend in ("triton", "torch"):
        full = ettrl_kernels.entropy_sample(logits, backend=backend, **keys)
        same = sum(all(torch.equal(a[0], b[i]) for a, b in zip(
            ettrl_kernels.entropy_sample(logits[i:i + 1], backend=backend, **row_params(keys, slice(i, i + 1))),
            full)) for i in picked)
        rows.append({"piece": f"sampler ({backend})", "case": f"{len(picked)} rows alone vs in a batch of {batch}",
                     "bitwise_equal": f"{same}/{len(picked)}", "ok": same == len(picked)})
    return rows


def decode_invariance(args, device) -> list[dict]:
    import torch

    from engine.attention.flashinfer import SPLIT_TOKENS, FlashInferPagedAttention
    usable, why = flashinfer_ready(args, device)
    if not usable:
        return [{"piece": "flashinfer decode", "case": f"skipped: {why}"}]
    rows = []
    for head_dim, group in ((64, 7), (128, 4)):
        kv_lens = [5000, 37, 2600, 300, SPLIT_TOKENS * 2 + 1, 16, 1029, SPLIT_TOKENS]
        k, v, tables, slots, q, new_k, new_v = scattered_batch(device, torch.bfloat16, kv_lens, [1] * len(kv_lens),
                                                               group=group, head_dim=head_dim)
        attn = FlashInferPagedAttention.create(k, v, q.shape[1], head_dim ** -0.5, None)
        attn.plan([1] * len(kv_lens), kv_lens, tables, slots)
        full = attn(0, q, new_k, new_v)
        same = 0
        for i in (0, 2, 4, 7):
            attn.plan([1], [kv_lens[i]], tables[i:i + 1], slots[i:i + 1])
            same += torch.equal(attn(0, q[i:i + 1], new_k[i:i + 1], new_v[i:i + 1]), full[i:i + 1])
        rows.append({"piece": "flashinfer decode", "case": f"head_dim {head_dim}, keys {kv_lens}",
                     "bitwise_equal": f"{same}/4", "ok": same == 4})
    return rows


def engine_invariance(args, device, tmp: Path) -> list[dict]:
    """The engine's greedy tokens and log-probabilities for a prompt alone and in a batch of 64. Not promised on
    CUDA (cuBLAS picks matmul kernels by the number of rows, docs/engine.md): reported, not judged."""
    import torch

    from engine import LLM, SamplingParams
    directory = model_dir(args, tmp, "smollm2-135m")
    llm = LLM(directory, dtype="bfloat16", device=str(device), gpu_memory_utilization=0.5,
              kv_cache_tokens=4096 if args.dry_run else 256 * 1024, attention_backend=attention_choice(args, device))
    gen = torch.Generator().manual_seed(5)
    vocab = shapes(args)["smollm2-135m"]["vocab_size"]
    batch = 8 if args.dry_run else 64
    prompts = [torch.randint(0, vocab, (int(n),), generator=gen).tolist()
               for n in torch.randint(20, 200, (batch,), generator=gen)]
    params = SamplingParams(temperature=0, max_tokens=8 if args.dry_run else 24, ignore_eos=True)
    alone = llm.generate(prompts[:1], params)[0].outputs[0]
    together = llm.generate(prompts, params)[0].outputs[0]
    n = next((i for i, (a, b) in enumerate(zip(alone.token_ids, together.token_ids)) if a != b), len(alone.token_ids))
    diff = max([abs(a - b) for a, b in zip(alone.logprobs[:n], together.logprobs[:n])] or [0.0])
    row = {"piece": f"engine greedy ({type(llm.engine.runner.attn).__name__})",
           "case": f"a prompt alone vs in a batch of {batch}", "same_tokens": f"{n}/{len(alone.token_ids)}",
           "max_logprob_diff": diff, "bitwise_equal": alone.logprobs == together.logprobs}
    del llm
    free_memory()
    return [row]


def model_dir(args, tmp: Path, name: str) -> Path:
    """A random model of `name`'s shape, saved once per run."""
    directory = tmp / f"{name}-model"
    if not directory.exists():
        random_model(shapes(args)[name], directory)
    return directory


def section_token_stats(args, device):
    import torch

    import ettrl_kernels
    rows_, vocab = (8, 500) if args.dry_run else (4096, 151936)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(1)
        logits = (torch.randn(rows_, vocab, device=device) * 3).to(dtype)
        targets = torch.randint(0, vocab, (rows_,), device=device)
        results = {}
        for backend in ("triton", "torch"):
            x = logits.clone().requires_grad_(True)

            def forward(x=x, backend=backend, targets=targets):
                return ettrl_kernels.token_stats(x, targets, temperature=0.7, backend=backend)

            def forward_backward(x=x, forward=forward):
                x.grad = None
                forward()[0].sum().backward()

            logp, ent = forward()
            forward_backward()
            results[backend] = (logp.detach(), ent, x.grad.clone())
            fwd = median_s(forward, device, args.repeats)
            both = median_s(forward_backward, device, args.repeats)
            nbytes = logits.numel() * logits.element_size()
            rows.append({"dtype": str(dtype).split(".")[-1], "backend": backend, "shape": f"{rows_}x{vocab}",
                         "fwd_ms": fwd * 1e3, "fwd_GB/s": nbytes / fwd / 1e9, "fwd_bwd_ms": both * 1e3,
                         "fwd_bwd_GB/s": 3 * nbytes / both / 1e9})
        (lt, et, gt), (lr, er, gr) = results["triton"], results["torch"]
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        diffs = {"logprob": float((lt - lr).abs().max()), "entropy": float((et - er).abs().max()),
                 "grad": float((gt.float() - gr.float()).abs().max())}
        rows[-2].update({f"max_{k}_diff_vs_torch": v for k, v in diffs.items()}, ok=max(diffs.values()) < tol)
    return rows


def hf_greedy(model, prompt: list[int], new_tokens: int, device):
    """transformers' greedy tokens and their log-probabilities (T = 1)."""
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=device), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, output_scores=True, return_dict_in_generate=True,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device))
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, tokens)]
    return tokens, logprobs


def section_greedy(args, device, dtype_name: str, tmp: Path):
    import torch

    from engine import LLM, SamplingParams
    from engine.config import DTYPES
    backend = attention_choice(args, device)
    new_tokens = 4 if args.dry_run else 32
    rows = []
    for name, shape in shapes(args).items():
        directory = tmp / f"{name}-model"
        model = random_model(shape, directory) if not directory.exists() else None
        if model is None:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(directory).eval()
        model = model.to(device=device, dtype=DTYPES[dtype_name])
        gen = torch.Generator().manual_seed(2)
        lengths = (5, 17) if args.dry_run else (5, 17, 33, 64)
        prompts = [torch.randint(0, shape["vocab_size"], (n,), generator=gen).tolist() for n in lengths]
        llm = LLM(directory, dtype=dtype_name, device=str(device), gpu_memory_utilization=0.5,
                  kv_cache_tokens=64 * 1024 if not args.dry_run else 4096, attention_backend=backend)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
        engine_s = time.perf_counter() - t0
        same, prefix, lp_diff = 0, [], 0.0
        for prompt, out in zip(prompts, outs):
            tokens, logprobs = hf_greedy(model, prompt, new_tokens, device)
            mine = out.outputs[0]
            n = next((i for i, (a, b) in enumerate(zip(tokens, mine.token_ids)) if a != b), len(tokens))
            same += n == len(tokens)
            prefix.append(n)
            if n:
                lp_diff = max(lp_diff, max(abs(a - b) for a, b in zip(logprobs[:n], mine.logprobs[:n])))
        attention = type(llm.engine.runner.attn).__name__
        rows.append({"model": name, "dtype": dtype_name, "attention": attention,
                     "sequences_equal": f"{same}/{len(prompts)}", "matching_prefix": str(prefix),
                     "max_logprob_diff": lp_diff, "engine_s": engine_s,
                     # fp32 must agree token for token; bf16 may part at near-ties of random logits
                     "ok": same == len(prompts) if dtype_name == "float32" else min(prefix) >= 1})
        del llm, model
        free_memory()
    return rows


def scattered_batch(device, dtype, kv_lens, q_lens, block_size=16, kv_heads=2, group=7, head_dim=64, layers=1):
    """A KV pool whose blocks are handed out in a random order, and the block tables of a batch over it."""
    import torch
    num_blocks = sum(-(-n // block_size) for n in kv_lens) + 8
    gen = torch.Generator().manual_seed(3)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    shape = (layers, num_blocks, block_size, kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(device, dtype)
    v = torch.randn(shape, generator=gen).to(device, dtype)
    tables, used = [], 0
    for n in kv_lens:
        pages = -(-n // block_size)
        tables.append(order[used:used + pages])
        used += pages
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
    slots = [tables[i][p // block_size] * block_size + p % block_size
             for i, (n, q) in enumerate(zip(kv_lens, q_lens)) for p in range(n - q, n)]
    q = torch.randn(sum(q_lens), kv_heads * group, head_dim, generator=gen).to(device, dtype)
    new_k = torch.randn(sum(q_lens), kv_heads, head_dim, generator=gen).to(device, dtype)
    new_v = torch.randn(sum(q_lens), kv_heads, head_dim, generator=gen).to(device, dtype)
    return k, v, block_tables, torch.tensor(slots, device=device), q, new_k, new_v


def dense_reference(k, v, block_tables, kv_lens, q_lens, q, scale):
    """Causal attention per sequence in float64 over its gathered keys (written already)."""
    import torch
    block_size, kv_heads = k.shape[2], k.shape[3]
    group = q.shape[1] // kv_heads
    outs, start = [], 0
    for i, (n, m) in enumerate(zip(kv_lens, q_lens)):
        pages = block_tables[i, :-(-n // block_size)]
        keys = k[0, pages].reshape(-1, kv_heads, k.shape[-1])[:n].double().repeat_interleave(group, 1)
        values = v[0, pages].reshape(-1, kv_heads, k.shape[-1])[:n].double().repeat_interleave(group, 1)
        queries = q[start:start + m].double()
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale
        pos_q = torch.arange(n - m, n, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(n, device=q.device)[None, :] > pos_q, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).reshape(m, -1))
        start += m
    return torch.cat(outs)


def section_attention(args, device):
    import torch

    from engine.attention.flashinfer import FlashInferPagedAttention
    from engine.attention.torch_paged import TorchPagedAttention
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = {"torch": TorchPagedAttention.create}
    usable, why = flashinfer_ready(args, device)
    if usable:
        backends["flashinfer"] = FlashInferPagedAttention.create
    cases = {  # name -> (kv_lens, q_lens, head_dim, group); 5000 and 4097 keys pass the 2048-token decode split
        "decode": ([37, 300, 1029, 16, 515], [1] * 5, 64, 7),
        "decode past the split": ([5000, 37, 2600, 4097, 2048], [1] * 5, 64, 7),
        "decode head_dim 128": ([5000, 300, 2049, 16], [1] * 4, 128, 4),
        "prefill": ([37, 300, 129, 16], [37, 20, 129, 5], 64, 7),
        "prefill head_dim 128": ([37, 2600, 129], [37, 64, 129], 128, 4)}
    if args.dry_run:
        cases = {"decode": ([37, 70, 16], [1] * 3, 64, 7), "decode head_dim 128": ([37, 16], [1] * 2, 128, 4),
                 "prefill": ([37, 30, 16], [37, 20, 5], 64, 7)}
    rows = []
    for case, (kv_lens, q_lens, head_dim, group) in cases.items():
        for name, create in backends.items():
            k, v, tables, slots, q, new_k, new_v = scattered_batch(device, dtype, kv_lens, q_lens, group=group,
                                                                   head_dim=head_dim)
            attn = create(k, v, q.shape[1], head_dim ** -0.5, None)
            attn.plan(q_lens, kv_lens, tables, slots)
            out = attn(0, q, new_k, new_v)
            ref = dense_reference(k, v, tables, kv_lens, q_lens, q, head_dim ** -0.5)
            err = float((out.double() - ref).abs().max())
            seconds = median_s(lambda attn=attn, q=q, new_k=new_k, new_v=new_v: attn(0, q, new_k, new_v), device,
                               args.repeats)
            rows.append({"case": case, "backend": name, "dtype": str(dtype).split(".")[-1], "head_dim": head_dim,
                         "kv_lens": str(kv_lens), "max_err_vs_fp64": err, "us": seconds * 1e6,
                         "ok": err < (2e-2 if dtype == torch.bfloat16 else 1e-4)})
    if not usable:
        rows.append({"case": "flashinfer", "backend": f"skipped: {why}"})
    return rows


def held_bytes(device) -> int:
    """Bytes the CUDA allocator has reserved, or this process's resident size on the CPU."""
    import torch
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else memory_in_use(device)


def section_memory(args, device, tmp: Path):
    """What the engine holds against gpu_memory_utilization (vLLM's meaning: weights, activations and KV pool at
    most that fraction of the GPU's total memory), after building it and after a batch of long prompts."""
    import torch

    from engine import LLM, SamplingParams
    from engine.gpu_memory import activation_bytes, module_bytes
    utilization = 0.3
    free_memory()
    before = held_bytes(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    llm = LLM(model_dir(args, tmp, "qwen2.5-0.5b"), dtype="bfloat16", device=str(device),
              gpu_memory_utilization=utilization, attention_backend=attention_choice(args, device),
              **({"kv_cache_memory_gb": 0.05} if args.dry_run else {}))
    built = held_bytes(device) - before
    runner, config = llm.engine.runner, llm.config
    weights, pool = module_bytes(runner.model), 2 * runner.kv.k.numel() * runner.kv.k.element_size()
    activations = activation_bytes(runner.args, config.max_num_batched_tokens, config.max_num_seqs, runner.dtype)
    gen = torch.Generator().manual_seed(4)
    vocab = shapes(args)["qwen2.5-0.5b"]["vocab_size"]
    batch, length = (4, 32) if args.dry_run else (64, 512)  # 8192 prompt tokens a prefill step, as the default
    prompts = [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(batch)]
    llm.generate(prompts, SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True))
    peak = (torch.cuda.max_memory_reserved(device) if device.type == "cuda" else held_bytes(device)) - before
    mib = 2**20
    row = {"gpu_memory_utilization": utilization, "weights_MiB": weights / mib, "kv_pool_MiB": pool / mib,
           "activation_estimate_MiB": activations / mib, "held_after_build_MiB": built / mib,
           "peak_after_generate_MiB": peak / mib}
    if device.type == "cuda":
        budget = utilization * torch.cuda.get_device_properties(device).total_memory
        row.update(budget_MiB=budget / mib, peak_over_budget=peak / budget, ok=peak <= budget)
    del llm
    free_memory()
    return [row]


def section_sleep(args, device, tmp: Path):
    """sleep(level=2) gives back the KV pool and the weights; wake_up(["weights"]) and then wake_up(["kv_cache"])
    bring them back, and greedy decoding gives the same tokens as before."""
    import torch

    from engine import LLM, SamplingParams
    from engine.gpu_memory import parameter_bytes
    llm = LLM(model_dir(args, tmp, "smollm2-135m"), dtype="bfloat16", device=str(device),
              kv_cache_tokens=4096 if args.dry_run else 128 * 1024, attention_backend=attention_choice(args, device))
    runner = llm.engine.runner
    if device.type != "cuda":
        runner.offloads_weights = True  # the dry run moves them host to host: the path, not the memory
    gen = torch.Generator().manual_seed(6)
    vocab = shapes(args)["smollm2-135m"]["vocab_size"]
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (9, 40, 77)]
    params = SamplingParams(temperature=0, max_tokens=8 if args.dry_run else 32, ignore_eos=True)
    before = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    pool, weights = 2 * runner.kv.k.numel() * runner.kv.k.element_size(), parameter_bytes(runner.model)
    free_memory()
    awake = held_bytes(device)
    llm.sleep(level=2)
    free_memory()
    asleep = held_bytes(device)
    llm.wake_up(["weights"])
    with_weights = held_bytes(device)
    llm.wake_up(["kv_cache"])
    after = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    mib = 2**20
    row = {"kv_pool_MiB": pool / mib, "weights_MiB": weights / mib, "freed_by_sleep_MiB": (awake - asleep) / mib,
           "weights_back_MiB": (with_weights - asleep) / mib, "same_tokens_after_wake_up": after == before}
    row["ok"] = after == before and (device.type != "cuda" or awake - asleep >= 0.9 * (pool + weights))
    del llm
    free_memory()
    return [row]


def section_sample_tree(args, device, tmp: Path):
    from engine import LLM, SamplingParams, TreeParams
    directory = tmp / "smollm2-135m-model"
    if not directory.exists():
        random_model(shapes(args)["smollm2-135m"], directory)
    llm = LLM(directory, dtype="bfloat16", device=str(device), gpu_memory_utilization=0.5,
              kv_cache_tokens=32 * 1024 if not args.dry_run else 4096, attention_backend=attention_choice(args, device))
    checks = {"n": 0}
    original = llm.engine.step

    def checked_step():
        finished = original()
        llm.check_integrity()
        checks["n"] += 1
        return finished

    llm.engine.step = checked_step
    prompts = [list(range(3, 40)), list(range(50, 61))]
    params = [SamplingParams(temperature=1.0, max_tokens=12 if args.dry_run else 64, seed=s, ignore_eos=True)
              for s in (1, 2)]
    t0 = time.perf_counter()
    results = llm.sample_tree(prompts, TreeParams(trees=3, forks=2, branches=2), params)
    seconds = time.perf_counter() - t0
    llm.engine.step = original
    llm.check_integrity()
    leaves = sum(len(r.leaves) for r in results)
    rows = [{"prompts": len(prompts), "leaves": leaves, "steps_checked": checks["n"], "seconds": seconds,
             "ok": checks["n"] > 0}]
    llm = None
    free_memory()
    return rows


def section_throughput(args, device, tmp: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from engine import LLM, SamplingParams, TreeParams
    name = "qwen2.5-0.5b"
    directory = tmp / f"{name}-model"
    if not directory.exists():
        random_model(shapes(args)[name], directory)
    batches = (4, 8) if args.dry_run else (64, 256)
    prompt_len, new_tokens = (16, 8) if args.dry_run else (128, 128)
    vocab = shapes(args)[name]["vocab_size"]
    rows = []
    llm = LLM(directory, dtype="bfloat16", device=str(device), gpu_memory_utilization=0.5,
              attention_backend=attention_choice(args, device))
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(batch // 4)]
        params = SamplingParams(temperature=0.8, max_tokens=new_tokens, n=4, seed=1, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(temperature=0.8, max_tokens=4, ignore_eos=True))  # warm-up
        sync(device)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        sync(device)
        seconds = time.perf_counter() - t0
        tokens = sum(len(o.token_ids) for r in outs for o in r.outputs)
        rows.append({"engine": "parallel", "batch": batch, "new_tokens": new_tokens, "tok/s": tokens / seconds})
        tree = TreeParams(trees=1, forks=1, branches=3)  # 4 leaves per prompt, as n=4
        sync(device)
        t0 = time.perf_counter()
        results = llm.sample_tree(prompts, tree, SamplingParams(temperature=0.8, max_tokens=new_tokens, seed=1,
                                                                ignore_eos=True))
        sync(device)
        seconds = time.perf_counter() - t0
        decoded = sum(r.stats.decoded_tokens for r in results)
        leaf_tokens = sum(r.stats.parallel_equivalent_tokens for r in results)
        rows.append({"engine": "tree 1x(1+1x3)", "batch": batch, "new_tokens": new_tokens,
                     "tok/s": decoded / seconds, "leaf tok/s": leaf_tokens / seconds})
    del llm
    free_memory()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(device).eval()
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, prompt_len), device=device)
        kwargs = {"do_sample": True, "temperature": 0.8, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
                      "attention_mask": torch.ones_like(ids), "pad_token_id": 0}
        with torch.no_grad():
            model.generate(ids[:1], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4,
                                       "attention_mask": torch.ones_like(ids[:1])})
            sync(device)
            t0 = time.perf_counter()
            model.generate(ids, **kwargs)
            sync(device)
        rows.append({"engine": "transformers generate", "batch": batch, "new_tokens": new_tokens,
                     "tok/s": batch * new_tokens / (time.perf_counter() - t0)})
    del model
    free_memory()
    return rows


def section_trainer(args, device, tmp: Path):
    from ettrl.config import load_config
    from ettrl.trainer import Trainer
    model_dir = tmp / "trainer-model"
    tiny = args.dry_run
    shape = {"model_type": "llama", "hidden_size": 64 if tiny else 512, "intermediate_size": 128 if tiny else 1536,
             "num_hidden_layers": 2 if tiny else 8, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 258, "max_position_embeddings": 1024, "tie_word_embeddings": False}
    random_model(shape, model_dir, tokenizer=True)
    data = tmp / "problems.jsonl"
    data.write_text("\n".join(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) for i in range(8)))
    cfg = load_config(None, [
        f"model.name={model_dir}", f"data.train={data}", "data.eval=", "data.prompt=plain", "method=ttrl",
        f"device={device.type}", "rollout.n_votes=4", "rollout.n_train=2", "rollout.max_tokens=16",
        "trainer.prompts_per_step=2", "trainer.micro_batch_size=4", "trainer.max_steps=2", "trainer.warmup_ratio=0",
        "engine.gpu_memory_utilization=0.3"])
    trainer = Trainer(cfg, tmp / "run", log=lambda *a: None)
    trainer.sleep_engine = True  # on the CPU too: the dry run exercises the sleep / wake path
    pools, sleeps = [], []
    original_sleep = trainer.llm.sleep

    def sleep(level=1):
        pools.append(weakref.ref(trainer.llm.engine.kv))
        before = memory_in_use(device)
        original_sleep(level)
        gc.collect()
        sleeps.append((before - memory_in_use(device)) / 2**20)

    trainer.llm.sleep = sleep
    rows = []
    for _ in range(2):
        t0 = time.perf_counter()
        record = trainer.train_step()
        rows.append({"step": record["step"], "loss": float(record.get("loss", float("nan"))),
                     "rollout_s": record["rollout_s"], "update_s": record["update_s"],
                     "seconds": time.perf_counter() - t0, "freed_MiB": sleeps[-1] if sleeps else None,
                     "ok": not trainer.llm.engine.asleep and pools[-1]() is None})  # a new pool
    trainer = None
    free_memory()
    return rows


def section_flashinfer_build(args, device):
    ready, why = flashinfer_ready(args, device)
    return [{"flashinfer": "built" if ready else why}]


# ---- flashinfer warm-up ----------------------------------------------------------------------------------------
def warm_flashinfer():
    """Builds flashinfer's prefill and decode kernels for the head sizes the check uses (run in the background)."""
    import torch

    from engine.attention.flashinfer import FlashInferPagedAttention
    for head_dim, group in ((64, 3), (64, 7), (128, 6)):
        k, v, tables, slots, q, new_k, new_v = scattered_batch(torch.device("cuda"), torch.bfloat16, [40, 20],
                                                               [1, 1], group=group, head_dim=head_dim)
        attn = FlashInferPagedAttention(k, v, q.shape[1], head_dim ** -0.5)
        attn.plan([1, 1], [40, 20], tables, slots)
        attn(0, q, new_k, new_v)
        attn.plan([40, 20], [40, 20], tables, torch.arange(60, device="cuda"))
        attn(0, torch.randn(60, q.shape[1], head_dim, device="cuda", dtype=torch.bfloat16),
             torch.randn(60, 2, head_dim, device="cuda", dtype=torch.bfloat16),
             torch.randn(60, 2, head_dim, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()


_warmup: dict = {}


def start_warmup(args, device, out: Path):
    import torch

    from engine.attention.flashinfer import flashinfer_usable
    if device.type != "cuda" or not flashinfer_usable(device, torch.bfloat16)[0]:
        return
    _warmup["log"] = out / "flashinfer_warmup.log"
    log = open(_warmup["log"], "w")  # noqa: SIM115 - lives as long as the process
    _warmup["process"] = subprocess.Popen([sys.executable, __file__, "--warm-flashinfer"], stdout=log,
                                          stderr=subprocess.STDOUT)


def wait_for_warmup(args):
    process = _warmup.get("process")
    if process is None or process.poll() is not None:
        return
    try:
        process.wait(timeout=args.warmup_timeout)
    except subprocess.TimeoutExpired:
        print(f"flashinfer warm-up still running after {args.warmup_timeout} s; going on", flush=True)


def flashinfer_ready(args, device) -> tuple[bool, str]:
    """(True, "") once flashinfer's kernels are built; else why it cannot serve (its sections use torch)."""
    import torch

    from engine.attention.flashinfer import flashinfer_usable
    usable, why = flashinfer_usable(device, torch.bfloat16)
    if not usable:
        return False, why
    wait_for_warmup(args)
    process = _warmup.get("process")
    if process is None:
        return False, "no warm-up was started"
    if process.poll() is None:
        return False, f"its JIT build still ran after {args.warmup_timeout} s"
    if process.returncode != 0:
        tail = _warmup["log"].read_text()[-1500:]
        return False, f"its warm-up failed (exit {process.returncode}): {tail}"
    return True, ""


def attention_choice(args, device) -> str:
    """The engine's attention backend for bf16 sections: auto (flashinfer on CUDA) once it is built, else torch."""
    return "auto" if device.type != "cuda" or flashinfer_ready(args, device)[0] else "torch"


# ---- main ------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check", help="folder for results.json and results.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter (CI)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup-timeout", type=float, default=240.0, help="seconds to wait for flashinfer's build")
    ap.add_argument("--only", nargs="*", default=None, help="run only these sections")
    ap.add_argument("--build-extension", action="store_true", help="only make sure engine._C is built, then exit")
    ap.add_argument("--warm-flashinfer", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    bootstrap()
    if args.build_extension:
        return 0
    if args.warm_flashinfer:
        return warm_flashinfer()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    if args.dry_run:
        torch.set_num_threads(1)  # tiny shapes: threads only add fork/join overhead (and CI shares its cores)
    args.repeats = args.repeats or (1 if args.dry_run else 10)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run on the CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    out = Path(args.out)
    report = Report(out, args)
    start_warmup(args, device, out)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        sections = [  # the most telling first: a run cut short still says whether the CUDA path is right
            ("env", section_env, args, device),
            ("sampling", section_sampling, args, device),
            ("invariance", section_invariance, args, device, tmp),
            ("attention", section_attention, args, device),
            ("greedy_bf16", section_greedy, args, device, "bfloat16", tmp),
            ("memory", section_memory, args, device, tmp),
            ("sleep", section_sleep, args, device, tmp),
            ("greedy_fp32", section_greedy, args, device, "float32", tmp),
            ("token_stats", section_token_stats, args, device),
            ("sample_tree", section_sample_tree, args, device, tmp),
            ("throughput", section_throughput, args, device, tmp),
            ("trainer", section_trainer, args, device, tmp),
            ("flashinfer_build", section_flashinfer_build, args, device),
        ]
        unknown = set(args.only or ()) - {name for name, *_ in sections}
        if unknown:
            sys.exit(f"unknown sections {sorted(unknown)}; choose from {[name for name, *_ in sections]}")
        for name, fn, *fn_args in sections:
            if args.only is None or name in args.only:
                report.run(name, fn, *fn_args)
    process = _warmup.get("process")
    if process is not None and process.poll() is None:
        process.kill()
    failed = [s["name"] for s in report.sections if s["status"] in ("fail", "error")]
    print(f"results in {out / 'results.json'} and {out / 'results.md'}; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
