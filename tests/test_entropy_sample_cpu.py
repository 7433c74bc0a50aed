"""The C++ entropy_sample (backend="cpp": CPU float32, no top-k/top-p) against the torch path and brute-force
references, and where "auto" picks it."""
import pytest
import torch
from test_entropy_sample import reference_stats, reference_tokens

import ettrl_kernels
from ettrl_kernels import sampling_cpu
from ettrl_kernels.noise import row_keys

pytestmark = pytest.mark.skipif(sampling_cpu.cpp_kernel() is None, reason="C++ extension not built")


def lm_like(batch, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 2 - torch.rand(vocab, generator=g) * 20
    logits[:, torch.randint(vocab, (5,), generator=g)] += 15
    return logits


CASES = [  # (logits, per-row keyword arguments of entropy_sample)
    (lambda: lm_like(16, 49152, 0), {"temperature": 0.6}),
    (lambda: lm_like(8, 1003, 1), {"temperature": torch.tensor([0.0, 0.6, 1.0, 1.7, 0.0, 0.3, 0.9, 2.0])}),
    (lambda: torch.randn(6, 4099) * 4, {"temperature": 1.0, "exclude": torch.tensor([0, -1, 4098, 7, -1, 31])}),
    (lambda: torch.randn(4, 31), {"temperature": 0.8}),  # one partial block of 32
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_cpp_matches_torch_path(case):
    make, kwargs = CASES[case]
    logits = make()
    logits[0, :5] = float("-inf")  # -inf logits add nothing to the sums
    batch = logits.shape[0]
    mismatches = 0
    for position in range(30):
        keys = dict(seeds=11, seq_ids=torch.arange(batch), positions=position, **kwargs)
        want = ettrl_kernels.entropy_sample(logits, **keys, backend="torch")
        got = ettrl_kernels.entropy_sample(logits, **keys, backend="cpp")
        mismatches += int((want[0] != got[0]).sum())
        torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got[2], want[2], atol=2e-5, rtol=1e-5)
    assert mismatches == 0  # ties within the last bits of the two `log`s are possible in principle, not here


def test_cpp_tokens_and_stats_match_brute_force():
    logits = lm_like(12, 3000, 3)
    temps = torch.tensor([0.7] * 6 + [0.0] * 2 + [1.3] * 4)
    for position in range(10):
        keys = row_keys(torch.full((12,), 5), torch.arange(12), torch.full((12,), position))
        tokens, logprobs, entropies = ettrl_kernels.entropy_sample(logits, temperature=temps, seeds=5,
                                                                   seq_ids=torch.arange(12), positions=position,
                                                                   backend="cpp")
        allowed = torch.ones_like(logits, dtype=torch.bool)
        sampled = reference_tokens(logits, torch.where(temps == 0, 1.0, temps)[:, None], allowed, keys)
        expected = torch.where(temps == 0, logits.argmax(-1), sampled)
        assert torch.equal(tokens, expected)
        logp, entropy = reference_stats(logits, temps)
        torch.testing.assert_close(logprobs.double(), logp.gather(1, tokens[:, None]).squeeze(1), atol=1e-4, rtol=0)
        torch.testing.assert_close(entropies.double(), entropy, atol=1e-4, rtol=0)


def test_auto_backend_uses_cpp_where_it_applies():
    logits = torch.randn(64, 100) * 3
    cases = [(logits, {}, "cpp"),
             (logits, {"top_p": 0.9}, "torch"),  # truncation: the torch path
             (logits, {"top_k": 5, "temperature": 0.0}, "cpp"),  # greedy rows truncate nothing
             (logits.bfloat16(), {}, "torch")]  # bfloat16 logits: the torch path
    for x, kwargs, name in cases:
        kwargs = {"temperature": 0.7, "seeds": 4, **kwargs}
        truncated = kwargs["temperature"] > 0 and ("top_k" in kwargs or "top_p" in kwargs)
        assert ettrl_kernels.resolve_backend("entropy_sample", "auto", x, truncated) == name
        auto = ettrl_kernels.entropy_sample(x, **kwargs)
        named = ettrl_kernels.entropy_sample(x, **kwargs, backend=name)
        assert all(torch.equal(a, b) for a, b in zip(auto, named))


@pytest.mark.parametrize("backend", ["cpp", "auto"])
def test_cpp_bad_rows_raise_the_torch_paths_errors(backend):
    logits = torch.randn(3, 40)
    logits[2, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ettrl_kernels.entropy_sample(logits, backend=backend)
    logits[2, 4] = float("inf")
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        ettrl_kernels.entropy_sample(logits, backend=backend)
    one_hot = torch.full((2, 40), float("-inf"))
    one_hot[:, 3] = 0.0
    with pytest.raises(ValueError, match="nonzero probability"):
        ettrl_kernels.entropy_sample(one_hot, exclude=torch.tensor([-1, 3]), backend=backend)
