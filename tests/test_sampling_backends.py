"""Each `entropy_sample` backend on its own against float64 references (not only against each other).

Backends, each named (ettrl_kernels/backend.py's table), so no other backend can answer for it: "torch", "cpp" (the
CPU extension: float32 logits without top-k / top-p) and "triton" (under TRITON_INTERPRET=1, set by conftest). The
references: log_softmax and entropy in float64, the allowed set by a full float64 sort, the token as the Gumbel-max
over the allowed set with the noise's uniform u (an exact multiple of 2**-24) turned into Gumbel noise in float64,
and sample frequencies against float64 softmax.
"""
import math

import pytest
import torch

import ettrl_kernels
from ettrl_kernels.noise import U_SCALE, mix32_, row_keys, uniform_bits_

BACKENDS = ["torch", "cpp", "triton"]


def cpp_available() -> bool:
    from ettrl_kernels.sampling_cpu import cpp_kernel
    return cpp_kernel() is not None


def sample(backend: str, logits, **kwargs):
    """entropy_sample on the named backend (skipped for "cpp" where the extension is not built)."""
    if backend == "cpp" and not cpp_available():
        pytest.skip("C++ extension not built")
    return ettrl_kernels.entropy_sample(logits, backend=backend, **kwargs)


def gumbel64(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """g = -log(-log u) in float64 for the sampler's exact u (noise.py)."""
    bits = torch.bitwise_xor(keys.to(torch.int32)[:, None], torch.arange(vocab, dtype=torch.int32)[None, :])
    u = uniform_bits_(mix32_(bits)).double() * U_SCALE
    return -torch.log(-torch.log(u))


def as_rows(value, batch, dtype):
    t = torch.as_tensor(value, dtype=dtype)
    return t.expand(batch).clone() if t.dim() == 0 else t


def reference(logits, temperature, top_k=-1, top_p=1.0, exclude=None, seeds=0, seq_ids=None, positions=0):
    """float64 (tokens, logprobs, entropies, allowed) by brute force."""
    batch, vocab = logits.shape
    x64 = logits.double()
    temp = as_rows(temperature, batch, torch.float64)
    greedy = temp == 0
    x = x64 / torch.where(greedy, torch.ones_like(temp), temp)[:, None]
    logp = torch.log_softmax(x, -1)
    entropy = -(logp.exp() * torch.where(logp.isinf(), 0.0, logp)).sum(-1)
    ks, ps = as_rows(top_k, batch, torch.int64), as_rows(top_p, batch, torch.float64)
    excl = as_rows(-1 if exclude is None else exclude, batch, torch.int64)
    allowed = torch.zeros(batch, vocab, dtype=torch.bool)
    for r in range(batch):
        row = x[r].clone()
        if excl[r] >= 0:
            row[excl[r]] = -math.inf
        values = row.sort(descending=True).values
        keep = int((values > -math.inf).sum())
        if not greedy[r]:
            if 0 < ks[r] < vocab:
                keep = min(keep, int(ks[r]))
            if ps[r] < 1:
                probs = torch.softmax(values, 0)[:keep]
                keep = min(keep, int(((probs / probs.sum()).cumsum(0) < ps[r]).sum()) + 1)
        allowed[r] = row >= values[keep - 1]
    seq_ids = torch.arange(batch) if seq_ids is None else seq_ids
    keys = row_keys(as_rows(seeds, batch, torch.int64), as_rows(seq_ids, batch, torch.int64),
                    as_rows(positions, batch, torch.int64))
    scores = torch.where(greedy[:, None], x, x + gumbel64(keys, vocab)).masked_fill(~allowed, -math.inf)
    tokens = scores.argmax(-1)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1), entropy, allowed


def lm_like(batch, vocab, seed, dtype=torch.float32):
    """A flat bulk plus a few strong tokens (exercises the torch path's pruning when V % 32 == 0)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 2
    spikes = torch.randint(0, vocab, (batch, 6), generator=g)
    return logits.scatter_add_(1, spikes, torch.rand(batch, 6, generator=g) * 6 + 4).to(dtype)


def check(backend, logits, **kwargs):
    tokens, logprobs, entropies = sample(backend, logits, **kwargs)
    want_tokens, want_logp, want_h, allowed = reference(logits, **kwargs)
    assert allowed.gather(1, tokens[:, None]).all(), "a token outside the allowed set"
    assert torch.equal(tokens, want_tokens)
    # float32 arithmetic over a few thousand logits: relative error ~1e-6
    torch.testing.assert_close(logprobs.double(), want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropies.double(), want_h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab", [1000, 1024])  # 1024: the torch path's pruned winners; 1000: dense
@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_and_stats_against_float64(backend, vocab):
    logits = lm_like(12, vocab, 1)
    temperature = torch.tensor([1.0, 0.6, 0.0, 1.5, 0.3, 1.0, 0.9, 0.0, 2.0, 0.7, 1.1, 0.5])
    for position in range(3):
        check(backend, logits, temperature=temperature, seeds=3, seq_ids=torch.arange(12) * 5 + 1,
              positions=position)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_against_float64(backend):
    """Masked (-inf) logits: 0 * -inf must not turn the entropy into NaN (the torch path redoes such rows)."""
    logits = lm_like(6, 640, 2)
    logits[0, ::2] = -math.inf
    logits[1, 5:] = -math.inf
    logits[3, :600] = -math.inf
    check(backend, logits, temperature=torch.tensor([1.0, 0.8, 1.0, 0.0, 1.3, 1.0]), seeds=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_against_float64(backend):
    logits = lm_like(8, 512, 3)
    exclude = logits.argmax(-1)
    exclude[1] = -1
    exclude[2] = 7
    check(backend, logits, temperature=torch.tensor([0.8, 1.0, 1.0, 0.0, 1.2, 0.5, 1.0, 0.0]),
          exclude=exclude, seeds=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slices_of_the_vocabulary_that_are_masked_or_hold_one_token(backend):
    """20000 tokens: three 8192-token slices for the Triton kernel, merged on the host. Row 0: the last slice all
    -inf (its partial sums are 0 and must add nothing); row 1: the middle slice holds a single finite logit
    below the row's maximum (its partial sum is exactly 1)."""
    logits = lm_like(3, 20000, 8)
    logits[0, 16384:] = -math.inf
    logits[1, 8192:16384] = -math.inf
    logits[1, 9000] = 1.0
    check(backend, logits, temperature=torch.tensor([1.0, 0.8, 1.0]), seeds=5)


@pytest.mark.parametrize("backend", ["torch", "triton"])  # the C++ op does no top-k / top-p
@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (-1, 0.7), (30, 0.5), (-1, 0.95)])
def test_top_k_top_p_against_float64(backend, top_k, top_p):
    logits = lm_like(10, 768, 4)
    check(backend, logits, temperature=torch.tensor([1.0, 0.7, 0.0, 1.4, 1.0, 0.9, 1.0, 0.6, 1.0, 2.0]),
          top_k=top_k, top_p=top_p, exclude=torch.tensor([-1, 3, -1, -1, -1, -1, -1, -1, -1, -1]), seeds=9,
          positions=2)


@pytest.mark.parametrize("backend", ["torch", "triton"])  # the C++ op takes float32 logits only
def test_bf16_logits_against_float64(backend):
    """bf16 logits are exact in float64; the product with 1/T must be formed in float32, not rounded to bf16."""
    logits = lm_like(8, 1024, 5, torch.bfloat16)
    for temperature in (0.7, torch.tensor([0.6, 1.0, 1.3, 0.0, 0.9, 0.7, 1.1, 0.35])):
        check(backend, logits, temperature=temperature, seeds=2)
        check(backend, logits, temperature=temperature, top_p=0.8, seeds=2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_top_p_after_excluding_a_token_that_holds_nearly_all_the_mass(backend):
    """A distinct branch excludes its root's token; when that token held all but ~1e-5 of the mass, top-p is
    taken over a remainder smaller than the float32 lse's rounding (test_truncation_thresholds.py)."""
    logits = lm_like(32, 512, 7) - 10
    logits[:, :4] = torch.tensor([40.0, 30.0, 28.5, 27.0])  # without token 0: p = 0.78, 0.17, 0.04, ...
    check(backend, logits, temperature=torch.linspace(0.8, 1.2, 32), top_p=0.8, exclude=0,
          seeds=torch.arange(32) + 20)


FREQUENCY_CASES = [{"temperature": 1.0}, {"temperature": 0.5}, {"temperature": 1.0, "exclude": 2},
                   {"temperature": 0.8, "top_k": 3}, {"temperature": 1.2, "top_p": 0.6}]


# Triton is left out: the interpreter runs one program per row (~20 ms each), and its tokens already equal the
# float64 Gumbel-max reference draw for draw above, whose frequencies these tests check through torch and C++.
# The C++ op does no top-k / top-p (test_a_backend_named_for_logits_it_cannot_run_says_why).
@pytest.mark.parametrize("backend,kwargs",
                         [(b, k) for b in ("torch", "cpp") for k in FREQUENCY_CASES
                          if b == "torch" or not {"top_k", "top_p"} & set(k)],
                         ids=lambda v: v if isinstance(v, str) else "-".join(f"{a}{b}" for a, b in v.items()))
def test_frequencies_against_float64_softmax(backend, kwargs):
    row = torch.tensor([2.0, 1.2, 0.9, 0.1, -0.4, -1.0, -2.5, 0.5])
    draws = 20000
    tokens, _, _ = sample(backend, row.expand(draws, -1).contiguous(), seeds=13, seq_ids=torch.arange(draws),
                          **kwargs)
    _, _, _, allowed = reference(row[None], **kwargs)
    target = torch.softmax(row.double() / kwargs["temperature"], 0) * allowed[0]
    target /= target.sum()
    freq = torch.bincount(tokens, minlength=8).double() / draws
    assert freq[~allowed[0]].sum() == 0
    # binomial standard error per token <= sqrt(0.25 / draws): 5 of them bound each deviation
    assert (freq - target).abs().max() < 5 * math.sqrt(0.25 / draws)


def test_a_backend_named_for_logits_it_cannot_run_says_why(monkeypatch):
    logits = lm_like(2, 64, 9)
    if cpp_available():
        for kwargs, why in [(dict(top_k=5), "it does no top-k / top-p"), (dict(top_p=0.9), "it does no top-k / top-p"),
                            (dict(logits=logits.bfloat16()), "it takes float32 logits, got torch.bfloat16")]:
            with pytest.raises(ValueError) as err:
                ettrl_kernels.entropy_sample(**{"logits": logits, **kwargs}, backend="cpp")
            assert str(err.value) == (f"backend='cpp' cannot run entropy_sample on these logits: {why}; name "
                                      "backend='torch' (any logits) or 'auto'")
        ettrl_kernels.entropy_sample(logits, top_k=5, temperature=0.0, backend="cpp")  # greedy rows: no truncation
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^backend='triton' cannot run entropy_sample on these logits: it needs CUDA"):
        ettrl_kernels.entropy_sample(logits, backend="triton")
    with pytest.raises(ValueError, match=r"^backend must be one of \('auto', 'triton', 'cpp', 'torch'\), got 'cuda'$"):
        ettrl_kernels.entropy_sample(logits, backend="cuda")
    with pytest.raises(ValueError, match=r"^backend must be one of \('auto', 'triton', 'torch'\), got 'cpp'$"):
        ettrl_kernels.token_stats(logits, torch.zeros(2, dtype=torch.int64), backend="cpp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_ties_take_the_first_token_across_tiles(backend):
    """Equal maxima far apart (different 1024-wide Triton tiles, different 32-wide torch/C++ blocks): the first."""
    logits = torch.randn(3, 3000)
    logits[0, [10, 2500]] = 9.0
    logits[1, [1500, 2999]] = 9.0
    logits[2, [700, 1800, 2900]] = 9.0
    tokens, _, _ = sample(backend, logits, temperature=0.0)
    assert tokens.tolist() == [10, 1500, 700]
