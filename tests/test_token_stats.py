"""ettrl_kernels.token_stats against log_softmax + gather (values and gradients), torch path and Triton interpreter."""
import pytest
import torch

import ettrl_kernels
from ettrl_kernels import token_stats_torch

BACKENDS = ["torch", "triton"]


def reference(logits, targets, temperature):
    logp = torch.log_softmax(logits.float() / torch.as_tensor(temperature).reshape(-1, 1), dim=-1)
    entropy = -(logp.exp() * torch.where(logp.isinf(), 0.0, logp)).sum(-1)
    return logp.gather(1, targets[:, None]).squeeze(1), entropy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.6, "per-row"])
def test_values_and_gradients_match_log_softmax(backend, temperature, monkeypatch):
    monkeypatch.setattr(token_stats_torch, "CHUNK", 300)  # several vocab chunks, last one partial
    torch.manual_seed(0)
    rows, vocab = 9, 1000
    if temperature == "per-row":
        temperature = torch.rand(rows) + 0.5
    logits = (torch.randn(rows, vocab) * 3).requires_grad_()
    logits.data[0, 100:] = float("-inf")
    targets = torch.randint(0, 100, (rows,))
    weights = torch.randn(rows)
    logprobs, entropies = ettrl_kernels.token_stats(logits, targets, temperature, backend=backend)
    assert not entropies.requires_grad
    (grad,) = torch.autograd.grad((logprobs * weights).sum(), logits)
    ref_logprobs, ref_entropies = reference(logits, targets, temperature)
    (ref_grad,) = torch.autograd.grad((ref_logprobs * weights).sum(), logits)
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropies, ref_entropies.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_gradients(backend):
    torch.manual_seed(1)
    logits = (torch.randn(4, 2500) * 2).bfloat16().requires_grad_()
    targets = torch.randint(0, 2500, (4,))
    logprobs, entropies = ettrl_kernels.token_stats(logits, targets, backend=backend)
    logprobs.sum().backward()
    reference_logits = logits.detach().float().requires_grad_()
    ref_logprobs, ref_entropies = reference(reference_logits, targets, 1.0)
    ref_logprobs.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropies, ref_entropies.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.grad.float(), reference_logits.grad, rtol=1e-2, atol=1e-4)


def test_triton_large_vocab_matches_torch():
    torch.manual_seed(2)
    logits = torch.randn(2, 40_000, requires_grad=True)
    targets = torch.tensor([5, 39_999])
    results = []
    for backend in BACKENDS:
        logprobs, entropies = ettrl_kernels.token_stats(logits, targets, 0.8, backend=backend)
        (grad,) = torch.autograd.grad(logprobs.sum(), logits)
        results.append((logprobs, entropies, grad))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_one_hot_rows_have_zero_entropy():
    logits = torch.full((2, 64), float("-inf"))
    logits[:, 7] = 2.0
    logprobs, entropies = ettrl_kernels.token_stats(logits, torch.tensor([7, 7]))
    assert logprobs.tolist() == [0.0, 0.0] and entropies.tolist() == [0.0, 0.0]


def test_bad_input_raises():
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match="targets"):
        ettrl_kernels.token_stats(logits, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="shape"):
        ettrl_kernels.token_stats(logits, torch.tensor([0, 1]))
    logits[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ettrl_kernels.token_stats(logits, torch.tensor([0, 1, 2]))
