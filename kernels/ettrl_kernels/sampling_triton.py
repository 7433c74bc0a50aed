"""Triton implementation of `entropy_sample`: each row's vocabulary is split into slices of SPLIT tokens, one
program per (row, slice), so a batch of 64 rows of 151936 logits runs 64 x 19 programs instead of 64 (which left
half of an H100's SMs idle); the slices' partial results are merged with torch.

Pass 1 keeps online accumulators per slice (max m, z = sum exp(x - m), s = sum exp(x - m) * (x - m)) and, when
no row needs a top-k/top-p threshold, the slice's Gumbel-max winner. Rows with truncation get their logit
threshold from `truncation_thresholds` (a top-k window, not a full sort) and a second, sampling-only pass.
The slices depend on V only, never on the batch, so results stay batch-invariant.
NOT YET RUN ON A GPU: tested with the Triton interpreter and compiled for sm_90 on the CPU.
"""
import torch
import triton
import triton.language as tl

from ettrl_kernels import noise
from ettrl_kernels.backend import device_guard
from ettrl_kernels.sampling_common import RowParams, SampleResult, check_finite_rows, truncation_thresholds
from ettrl_kernels.triton_online import online_entropy_update

MIX_MUL1 = tl.constexpr(noise.MIX_MUL1)
MIX_MUL2 = tl.constexpr(noise.MIX_MUL2)
U_SCALE = tl.constexpr(noise.U_SCALE)
SPLIT = 8192  # vocabulary tokens per program (rounded to whole tiles)


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
def _entropy_sample_kernel(logits_ptr, stride, vocab, split_size, inv_temp_ptr, greedy_ptr, keys_ptr, exclude_ptr,
                           threshold_ptr, m_ptr, z_ptr, s_ptr, bad_ptr, token_ptr, best_ptr,
                           STATS: tl.constexpr, SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    part = row * tl.num_programs(1) + tl.program_id(1)
    row_ptr = logits_ptr + row.to(tl.int64) * stride
    begin = tl.program_id(1) * split_size
    end = tl.minimum(begin + split_size, vocab)
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
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < end
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
        tl.store(m_ptr + part, m)
        tl.store(z_ptr + part, z)
        tl.store(s_ptr + part, s)
        tl.store(bad_ptr + part, bad)
    if SAMPLE:
        tl.store(token_ptr + part, token)
        tl.store(best_ptr + part, best)


def merge_stats(m: torch.Tensor, z: torch.Tensor, s: torch.Tensor,
                bad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logsumexp, entropy, max or NaN for rows with NaN/+inf) of rows from their slices' accumulators [B, S]:
    z = sum_j z_j e^(m_j - M), s = sum_j e^(m_j - M) (s_j + z_j (m_j - M)) for M = max_j m_j."""
    top = m.amax(dim=1)
    ref = torch.where(top == float("-inf"), 0.0, top)[:, None]
    weight = torch.exp(m - ref)
    shift = torch.where(z > 0, m - ref, 0.0)
    total = (z * weight).sum(1)
    weighted = (weight * (s + z * shift)).sum(1)
    log_z = total.log()
    return top + log_z, log_z - weighted / total, torch.where(bad.any(1), float("nan"), top)


def merge_winners(best: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's best score and its token over the slices [B, S]; ties go to the first slice (lowest token)."""
    row_best, part = best.max(dim=1)
    return row_best, token.gather(1, part[:, None]).squeeze(1).to(torch.int64)


def split_size(vocab: int, block: int) -> int:
    """Tokens per program: SPLIT rounded to whole tiles (a function of V only: batch-invariant)."""
    return min(triton.cdiv(vocab, block), triton.cdiv(SPLIT, block)) * block


def entropy_sample_triton(logits: torch.Tensor, params: RowParams, block: int = 1024) -> SampleResult:
    batch, vocab = logits.shape
    device = logits.device
    block = min(block, triton.next_power_of_2(vocab))
    size = split_size(vocab, block)
    splits = triton.cdiv(vocab, size)
    m, z, s, best = (torch.empty(batch, splits, dtype=torch.float32, device=device) for _ in range(4))
    bad = torch.empty(batch, splits, dtype=torch.int32, device=device)
    token = torch.empty(batch, splits, dtype=torch.int32, device=device)
    threshold = torch.full((batch,), float("-inf"), device=device)
    greedy = params.greedy.to(torch.int8)

    def launch(stats: bool, sample: bool) -> None:
        with device_guard(logits):
            _entropy_sample_kernel[(batch, splits)](
                logits, logits.stride(0), vocab, size, params.inv_temp, greedy, params.keys, params.exclude,
                threshold, m, z, s, bad, token, best, STATS=stats, SAMPLE=sample, BLOCK=block)

    launch(True, not params.truncated)
    lse, entropies, max_x = merge_stats(m, z, s, bad)
    if params.truncated:
        check_finite_rows(max_x)
        threshold = truncation_thresholds(logits, lse, params)
        launch(False, True)
    row_best, tokens = merge_winners(best, token)
    check_finite_rows(max_x, row_best)
    logprobs = logits.gather(1, tokens[:, None]).squeeze(1).float() * params.inv_temp - lse
    return tokens, logprobs, entropies
