"""The machine the benchmarks ran on, and the roofline floor of a generation or a prefill: no engine can beat it on
this CPU.

Per decode step at batch b and context L: max(matmul FLOPs / the measured matmul rate, (weight + KV bytes) / the
measured memory bandwidth), where FLOPs = b x (2 x matmul parameters + 4 x layers x heads x head_dim x L) (the
projections, lm_head and attention's q.k and p.v) and the bytes are every matmul weight once plus each row's K and
V. The prefill of the distinct prompts is one more step; the floor in tok/s is the generated tokens over the summed
steps.
"""
import platform
import time

import torch

from engine.layers import packed_linear
from engine.layers.matmul_choice import cpu_description


def machine_header() -> str:
    cpu = cpu_description()
    return (f"CPU: {cpu['cpu']} ({platform.machine()}), features: {' '.join(cpu['features']) or 'none of interest'}, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def _best_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_gflops(dtype: torch.dtype, n: int = 2048, rows: int = 256, repeats: int = 5) -> float:
    """The machine's compute roof as far as it can be reached here: the best rate of an n x n x n torch matmul
    (oneDNN/MKL) and of the engine's own panel_linear (rows x n x n) where the CPU has it, so the engine never beats
    its floor by running a faster kernel than the one that measured the roof."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = 2 * n**3 / _best_seconds(lambda: a @ b, repeats)
    if packed_linear.panels_supported(b):
        x, panels = torch.randn(rows, n, dtype=dtype), packed_linear.pack_panels(b)
        best = max(best, 2 * rows * n * n / _best_seconds(lambda: packed_linear.linear(x, b, None, panels), repeats))
    return best / 1e9


def memory_gbps(mib: int = 256, repeats: int = 5) -> float:
    """Best copy bandwidth (bytes read + written) over buffers much larger than the caches."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / min(times) / 1e9


def model_sizes(model) -> dict:
    """Matmul parameters (layers + lm_head, tied or not), the lm_head's, and the attention shape of an engine
    CausalLM."""
    a = model.args
    params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n != "embed_tokens")
    params += model.lm_head.numel() * bool(a.tie_word_embeddings)
    return {"matmul_params": params, "lm_head_params": model.lm_head.numel(), "layers": a.num_layers,
            "heads": a.num_heads, "kv_heads": a.num_kv_heads, "head_dim": a.head_dim}


def prefill_seconds(sizes: dict, dtype: torch.dtype, tokens: int, gflops: float, gbps: float) -> float:
    """The floor of one prompt's prefill: the layers' matmuls for every token and the lm_head for the last one, q.k
    and p.v over the causal half of the key pairs (tokens^2 / 2), at the measured matmul rate; or the weight and
    KV bytes at the measured bandwidth where that takes longer."""
    elt = torch.finfo(dtype).bits // 8
    head = sizes.get("lm_head_params", 0)
    attn_flops = 4 * sizes["layers"] * sizes["heads"] * sizes["head_dim"]
    flops = 2 * (sizes["matmul_params"] - head) * tokens + 2 * head + attn_flops * tokens * tokens / 2
    kv_bytes = tokens * 2 * sizes["layers"] * sizes["kv_heads"] * sizes["head_dim"] * elt
    return max(flops / (gflops * 1e9), (sizes["matmul_params"] * elt + kv_bytes) / (gbps * 1e9))


def floor_tokens_per_s(sizes: dict, dtype: torch.dtype, batch: int, prompt_len: int, new_tokens: int,
                       gflops: float, gbps: float, distinct_prompts: int | None = None) -> float:
    """Tokens/s of b samples x new_tokens; `distinct_prompts` (default: b) is how many prompts the b samples have,
    each of which must be prefilled once (b samples of one prompt need one prefill of it, not b)."""
    prompts = batch if distinct_prompts is None else distinct_prompts
    elt = torch.finfo(dtype).bits // 8
    weight_bytes = sizes["matmul_params"] * elt
    kv_per_token = 2 * sizes["layers"] * sizes["kv_heads"] * sizes["head_dim"] * elt
    attn_flops = 4 * sizes["layers"] * sizes["heads"] * sizes["head_dim"]

    def step(rows: int, context: float) -> float:
        flops = rows * (2 * sizes["matmul_params"] + attn_flops * context)
        return max(flops / (gflops * 1e9), (weight_bytes + rows * context * kv_per_token) / (gbps * 1e9))

    total = step(prompts * prompt_len, prompt_len / 2)
    total += sum(step(batch, prompt_len + t) for t in range(1, new_tokens))
    return batch * new_tokens / total
