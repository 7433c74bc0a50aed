"""Triton implementation of `entropy_sample`: one program per row tiles over V once.

Pass 1 keeps online accumulators (max m, z = sum exp(x - m), s = sum exp(x - m) * (x - m)) and, when no row
needs a top-k/top-p threshold, the running Gumbel-max winner. Rows with truncation get their logit threshold
from `truncation_thresholds` (a top-k window, not a full sort) and a second, sampling-only pass.
"""
import torch
import triton
import triton.language as tl

from ettrl_kernels.triton_online import online_entropy_update

from ettrl_kernels import noise
from ettrl_kernels.backend import device_guard
from ettrl_kernels.sampling_common import RowParams, check_finite_rows, truncation_thresholds

MIX_MUL1 = tl.constexpr(noise.MIX_MUL1)
MIX_MUL2 = tl.constexpr(noise.MIX_MUL2)
U_SCALE = tl.constexpr(noise.U_SCALE)


@triton.jit
def gumbel_log_exponential(key, token):
    """log(-log(u)) for u = noise.py's uniform of (key, token): the Gumbel noise is its negation."""
    h = (key ^ token).to(tl.uint32, bitcast=True)
    h ^= h >> 16
    h *= MIX_MUL1
    h ^= h >> 15
    h *= MIX_MUL2
    h ^= h >> 16
    u = ((h >> 8) | 1).to(tl.float32) * U_SCALE
    return tl.log(-tl.log(u))


@triton.jit
def _entropy_sample_kernel(logits_ptr, stride, vocab, inv_temp_ptr, greedy_ptr, keys_ptr, exclude_ptr,
                           threshold_ptr, lse_ptr, entropy_ptr, max_ptr, token_ptr, best_ptr,
                           STATS: tl.constexpr, SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride
    inv_temp = tl.load(inv_temp_ptr + row)
    greedy = tl.load(greedy_ptr + row) != 0
    key = tl.load(keys_ptr + row)
    excluded = tl.load(exclude_ptr + row).to(tl.int32)
    threshold = tl.load(threshold_ptr + row)
    neg_inf = float("-inf")
    m = tl.full([], neg_inf, tl.float32)
    z = tl.zeros([], tl.float32)
    s = tl.zeros([], tl.float32)
    bad = tl.zeros([], tl.int32)
    best = tl.full([], neg_inf, tl.float32)
    token = tl.zeros([], tl.int32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < vocab
        logit = tl.load(row_ptr + offs, mask=inside, other=neg_inf).to(tl.float32)
        x = logit * inv_temp
        if STATS:
            bad |= tl.max(((x != x) | (x == float("inf"))).to(tl.int32), axis=0)
            m, z, s = online_entropy_update(m, z, s, x)
        if SAMPLE:
            noise = gumbel_log_exponential(key, offs)
            score = tl.where(greedy, x, x - noise)
            allowed = inside & (logit >= threshold) & (offs != excluded)
            score = tl.where(allowed, score, neg_inf)
            tile_best = tl.max(score, axis=0)
            tile_token = tl.argmax(score, axis=0).to(tl.int32) + start
            better = tile_best > best
            token = tl.where(better, tile_token, token)
            best = tl.where(better, tile_best, best)
    if STATS:
        log_z = tl.log(z)
        tl.store(lse_ptr + row, m + log_z)
        tl.store(entropy_ptr + row, log_z - s / z)
        tl.store(max_ptr + row, tl.where(bad != 0, float("nan"), m))
    if SAMPLE:
        tl.store(token_ptr + row, token.to(tl.int64))
        tl.store(best_ptr + row, best)


def entropy_sample_triton(logits: torch.Tensor, params: RowParams, block: int = 1024):
    batch, vocab = logits.shape
    device = logits.device
    lse = torch.empty(batch, dtype=torch.float32, device=device)
    entropies = torch.empty_like(lse)
    max_x = torch.empty_like(lse)
    best = torch.empty_like(lse)
    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    threshold = torch.full((batch,), float("-inf"), device=device)
    greedy = params.greedy.to(torch.int8)
    block = min(block, triton.next_power_of_2(vocab))

    def launch(stats: bool, sample: bool):
        with device_guard(logits):
            _entropy_sample_kernel[(batch,)](
                logits, logits.stride(0), vocab, params.inv_temp, greedy, params.keys, params.exclude, threshold,
                lse, entropies, max_x, tokens, best, STATS=stats, SAMPLE=sample, BLOCK=block)

    launch(True, not params.truncated)
    if params.truncated:
        check_finite_rows(max_x, torch.zeros_like(best))
        threshold = truncation_thresholds(logits, lse, params)
        launch(False, True)
    check_finite_rows(max_x, best)
    logprobs = logits.gather(1, tokens[:, None]).squeeze(1).float() * params.inv_temp - lse
    return tokens, logprobs, entropies
