"""Torch implementation of `entropy_sample` (CPU path and reference for the Triton kernel).

Rows are processed in chunks small enough that the working buffers stay in cache, and the buffers are reused
between calls, so a call touches the logits once from memory and allocates no [B, V] temporaries.
"""
import torch

from kernels.noise import U_SCALE, mix32_, uniform_bits_
from kernels.sampling import RowParams, check_finite_rows, truncation_thresholds

CHUNK_ELEMENTS = 1 << 18
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


def _entropy_stats(x: torch.Tensor, shifted: torch.Tensor, probs_unnorm: torch.Tensor):
    """Row max, logsumexp and entropy of softmax(x) for a chunk x [R, V], using two same-shape buffers."""
    max_x = x.amax(dim=1, keepdim=True)
    torch.sub(x, max_x.clamp(min=-3e38, max=3e38), out=shifted)
    torch.exp(shifted, out=probs_unnorm)
    total = probs_unnorm.sum(dim=1, keepdim=True)
    weighted = torch.linalg.vecdot(probs_unnorm, shifted).unsqueeze(1)
    if bool(weighted.isnan().any()):  # 0 * -inf from -inf logits: redo those rows without them
        rows = weighted.isnan().flatten()
        weighted[rows] = torch.where(probs_unnorm[rows] > 0, probs_unnorm[rows] * shifted[rows], 0.0).sum(
            dim=1, keepdim=True)
    log_total = total.log()
    return max_x.squeeze(1), (max_x + log_total).squeeze(1), (log_total - weighted / total).squeeze(1)


def _gumbel_scores(x, keys, token_ids, bits, tmp, out):
    """out = x + g(key, token) for a chunk (the noise definition of noise.py, computed in place)."""
    torch.bitwise_xor(token_ids[None, :], keys[:, None], out=bits)
    uniform_bits_(mix32_(bits, tmp))
    out.copy_(bits).mul_(U_SCALE).log_().neg_().log_()
    return torch.sub(x, out, out=out)


def entropy_sample_torch(logits: torch.Tensor, params: RowParams):
    batch, vocab = logits.shape
    rows_per_chunk = max(1, min(batch, CHUNK_ELEMENTS // vocab))
    ws = _workspace(logits.device, rows_per_chunk * vocab)
    token_ids = torch.arange(vocab, dtype=torch.int32, device=logits.device)
    tokens = torch.empty(batch, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=logits.device)
    entropies = torch.empty(batch, dtype=torch.float32, device=logits.device)
    for start in range(0, batch, rows_per_chunk):
        rows = slice(start, min(batch, start + rows_per_chunk))
        n = rows.stop - start
        chunk = logits[rows]
        x = torch.mul(chunk, params.inv_temp[rows, None], out=ws["x"][: n * vocab].view(n, vocab))
        scores = ws["f"][: n * vocab].view(n, vocab)
        max_x, lse, entropies[rows] = _entropy_stats(x, scores, ws["e"][: n * vocab].view(n, vocab))
        _gumbel_scores(x, params.keys[rows], token_ids, ws["bits"][: n * vocab].view(n, vocab),
                       ws["tmp"][: n * vocab].view(n, vocab), scores)
        greedy = params.greedy[rows]
        if bool(greedy.any()):
            scores[greedy] = x[greedy]
        if params.truncated:
            threshold = truncation_thresholds(chunk, lse, _slice_params(params, rows))
            cut = torch.lt(chunk, threshold[:, None], out=ws["mask"][: n * vocab].view(n, vocab))
            scores.masked_fill_(cut, float("-inf"))
        if params.any_exclude:
            excluded = params.exclude[rows]
            hit = torch.nonzero(excluded >= 0).flatten()
            scores[hit, excluded[hit]] = float("-inf")
        best, chunk_tokens = scores.max(dim=1)
        check_finite_rows(max_x, best)
        tokens[rows] = chunk_tokens
        logprobs[rows] = x.gather(1, chunk_tokens[:, None]).squeeze(1) - lse
    return tokens, logprobs, entropies


def _slice_params(params: RowParams, rows: slice) -> RowParams:
    return RowParams(params.inv_temp[rows], params.greedy[rows], params.top_k[rows], params.top_p[rows],
                     params.keys[rows], params.exclude[rows], params.truncated, params.any_exclude)
