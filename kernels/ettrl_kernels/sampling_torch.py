"""Torch implementation of `entropy_sample` (CPU path and reference for the Triton kernel).

Rows are processed in chunks of about CHUNK_ELEMENTS logits whose working buffers stay in the last-level
cache and are reused between calls (so the path is not thread-safe), so a call reads the logits from memory
once and allocates no [B, V] temporaries. The Gumbel noise, the dominant cost, is drawn only for the 32-token
blocks that can still win (exact; see `_pruned_winners`), or for every token when the logits are too flat.
"""
import torch

from ettrl_kernels.noise import GUMBEL_MAX, U_SCALE, mix32_, uniform_bits_
from ettrl_kernels.sampling_common import RowParams, SampleResult, check_finite_rows, truncation_thresholds

CHUNK_ELEMENTS = 1 << 20  # single-threaded: the chunk's buffers stay in cache
# With several threads every op is an OpenMP fork/join, which costs milliseconds on busy shared cores: use
# fewer, larger ops (faster on busy cores, a little slower on idle ones: docs/benchmarks.md).
CHUNK_ELEMENTS_THREADED = 1 << 22
PRUNE_BLOCK = 32
PRUNE_MAX_FRACTION = 2  # use the pruned path while at most half of the blocks can win
_workspaces: dict = {}


def _workspace(device, elements: int) -> dict:
    key = (str(device), elements)
    if key not in _workspaces:
        _workspaces.clear()
        _workspaces[key] = {
            "x": torch.empty(elements, dtype=torch.float32, device=device),
            "f": torch.empty(elements, dtype=torch.float32, device=device),
            "e": torch.empty(elements, dtype=torch.float32, device=device),
            "bits": torch.empty(elements, dtype=torch.int32, device=device),
            "tmp": torch.empty(elements, dtype=torch.int32, device=device),
            "mask": torch.empty(elements, dtype=torch.bool, device=device),
        }
    return _workspaces[key]


def _entropy_stats(x: torch.Tensor, max_x: torch.Tensor, shifted: torch.Tensor, probs_unnorm: torch.Tensor):
    """Logsumexp and entropy of softmax(x) for a chunk x [R, V] with row max max_x, using two buffers."""
    max_x = max_x[:, None].clamp(min=-3e38, max=3e38)
    torch.sub(x, max_x, out=shifted)
    torch.exp(shifted, out=probs_unnorm)
    total = probs_unnorm.sum(dim=1, keepdim=True)
    weighted = shifted.mul_(probs_unnorm).sum(dim=1, keepdim=True)
    nan_rows = weighted.isnan().flatten()
    if bool(nan_rows.any()):  # 0 * -inf from -inf logits: redo those rows without them
        y = x[nan_rows] - max_x[nan_rows]
        weighted[nan_rows] = (y.exp() * y.clamp(min=-3e38)).sum(dim=1, keepdim=True)
    log_total = total.log()
    return (max_x + log_total).squeeze(1), (log_total - weighted / total).squeeze(1)


def _block_max(x: torch.Tensor):
    """Maxima of the PRUNE_BLOCK-wide blocks of each row [R, V / PRUNE_BLOCK], or None if V is not a multiple."""
    n, vocab = x.shape
    return None if vocab % PRUNE_BLOCK else x.view(n, vocab // PRUNE_BLOCK, PRUNE_BLOCK).amax(dim=2)


def _log_exponential_(bits: torch.Tensor, tmp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = log(-log(u)) = -g for the keyed bits already in `bits` (noise.py's definition, in place)."""
    uniform_bits_(mix32_(bits, tmp))
    return out.copy_(bits).mul_(U_SCALE).log_().neg_().log_()


def _dense_winners(x, chunk, keys, greedy, threshold, ws):
    """Gumbel-max over every token of the chunk: (best score, token) per row."""
    n, vocab = x.shape
    bits = torch.bitwise_xor(torch.arange(vocab, dtype=torch.int32, device=x.device)[None, :], keys[:, None],
                             out=ws["bits"][: n * vocab].view(n, vocab))
    scores = _log_exponential_(bits, ws["tmp"][: n * vocab].view(n, vocab), ws["f"][: n * vocab].view(n, vocab))
    torch.sub(x, scores, out=scores)
    if bool(greedy.any()):
        scores[greedy] = x[greedy]
    if threshold is not None:
        scores.masked_fill_(torch.lt(chunk, threshold[:, None], out=ws["mask"][: n * vocab].view(n, vocab)),
                            float("-inf"))
    return _first_argmax(scores)


def _first_argmax(scores: torch.Tensor, block_max: torch.Tensor | None = None):
    """(max, index of its first occurrence) per row; via block maxima, which torch reduces much faster than a
    full max-with-indices."""
    n, vocab = scores.shape
    block_max = _block_max(scores) if block_max is None else block_max
    if block_max is None:
        return scores.max(dim=1)
    best, block = block_max.max(dim=1)
    blocks = scores.view(n, vocab // PRUNE_BLOCK, PRUNE_BLOCK)
    offset = blocks[torch.arange(n, device=scores.device), block].max(dim=1).indices
    return best, block * PRUNE_BLOCK + offset


def _pruned_winners(x, chunk, keys, greedy, threshold, block_max):
    """Exact Gumbel-max that draws noise only for blocks of PRUNE_BLOCK tokens that can still win.

    The best allowed score is at least the score of the largest x (always allowed: excluded tokens are -inf
    in x and truncation keeps the top), and noise never exceeds GUMBEL_MAX, so a token with
    x < that score - GUMBEL_MAX never wins (a margin covers rounding). Language-model logits at the usual
    temperatures leave few such blocks; returns None when too many survive (flat logits).
    """
    n, vocab = x.shape
    top_x, top_token = _first_argmax(x, block_max)
    top_bits = torch.bitwise_xor(top_token.to(torch.int32), keys)
    floor = top_x - _log_exponential_(top_bits, torch.empty_like(top_bits), torch.empty_like(top_x))
    floor = torch.where(greedy, top_x, floor)
    cut = floor - GUMBEL_MAX - (1e-3 + floor.abs() * 2.0 ** -20)
    blocks = x.view(n, vocab // PRUNE_BLOCK, PRUNE_BLOCK)
    hit = torch.nonzero(block_max >= cut[:, None])
    if hit.shape[0] * PRUNE_MAX_FRACTION > blocks.shape[0] * blocks.shape[1]:
        return None
    rows, block = hit[:, 0], hit[:, 1]
    ids = block[:, None] * PRUNE_BLOCK + torch.arange(PRUNE_BLOCK, device=x.device)
    candidates = blocks[rows, block]
    bits = torch.bitwise_xor(ids.to(torch.int32), keys[rows, None])
    scores = candidates - _log_exponential_(bits, torch.empty_like(bits), torch.empty_like(candidates))
    scores = torch.where(greedy[rows, None], candidates, scores)
    if threshold is not None:
        logits = chunk.view(n, -1, PRUNE_BLOCK)[rows, block]
        scores.masked_fill_(logits < threshold[rows, None], float("-inf"))
    block_best, block_arg = scores.max(dim=1)
    best = torch.full((n,), float("-inf"), device=x.device).scatter_reduce_(0, rows, block_best, "amax")
    winner = torch.where(block_best == best[rows], ids.gather(1, block_arg[:, None]).squeeze(1), vocab)
    return best, torch.full((n,), vocab, device=x.device).scatter_reduce_(0, rows, winner, "amin")


def _scaled(chunk: torch.Tensor, inv_temp, out: torch.Tensor) -> torch.Tensor:
    """out = chunk.float() * inv_temp, in float32: torch.mul(bf16, python float) rounds the product to bf16."""
    if chunk.dtype == torch.float32:
        return torch.mul(chunk, inv_temp, out=out)
    return out.copy_(chunk).mul_(inv_temp)


def entropy_sample_torch(logits: torch.Tensor, params: RowParams) -> SampleResult:
    batch, vocab = logits.shape
    chunk_elements = CHUNK_ELEMENTS if torch.get_num_threads() == 1 else CHUNK_ELEMENTS_THREADED
    rows_per_chunk = max(1, min(batch, chunk_elements // vocab))
    ws = _workspace(logits.device, rows_per_chunk * vocab)
    tokens = torch.empty(batch, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=logits.device)
    entropies = torch.empty(batch, dtype=torch.float32, device=logits.device)
    same_temp = float(params.inv_temp[0]) if bool((params.inv_temp == params.inv_temp[0]).all()) else None
    for start in range(0, batch, rows_per_chunk):
        rows = slice(start, min(batch, start + rows_per_chunk))
        n = rows.stop - start
        chunk = logits[rows]
        x = _scaled(chunk, params.inv_temp[rows, None] if same_temp is None else same_temp,
                    ws["x"][: n * vocab].view(n, vocab))
        block_max = _block_max(x)
        max_x = x.amax(dim=1) if block_max is None else block_max.amax(dim=1)
        lse, entropies[rows] = _entropy_stats(x, max_x, ws["f"][: n * vocab].view(n, vocab),
                                              ws["e"][: n * vocab].view(n, vocab))
        check_finite_rows(max_x)  # NaN / +inf now; rows left without an allowed token after sampling
        threshold = None
        if params.truncated:
            threshold = truncation_thresholds(chunk, lse, _slice_params(params, rows))
        if params.any_exclude:  # the excluded token's score becomes -inf; x stays valid for every other token
            excluded = params.exclude[rows]
            hit = torch.nonzero(excluded >= 0).flatten()
            x[hit, excluded[hit]] = float("-inf")
            if block_max is not None:
                block_max[hit] = _block_max(x[hit])
        keys, greedy = params.keys[rows], params.greedy[rows]
        winners = None
        if block_max is not None:
            winners = _pruned_winners(x, chunk, keys, greedy, threshold, block_max)
        if winners is None:
            winners = _dense_winners(x, chunk, keys, greedy, threshold, ws)
        best, chunk_tokens = winners
        check_finite_rows(max_x, best)
        tokens[rows] = chunk_tokens
        logprobs[rows] = x.gather(1, chunk_tokens[:, None]).squeeze(1) - lse
    return tokens, logprobs, entropies


def _slice_params(params: RowParams, rows: slice) -> RowParams:
    return RowParams(params.inv_temp[rows], params.greedy[rows], params.top_k[rows], params.top_p[rows],
                     params.keys[rows], params.exclude[rows], params.truncated, params.any_exclude)
