"""The trainer's token statistics: a prompt shared by its responses (run once) gives the padded batch's numbers."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ettrl.policy import load_policy, pad_batch, response_stats, shared_prompt_stats  # noqa: E402
from ettrl.samples import TrainSample  # noqa: E402
from ettrl.update import _stats  # noqa: E402
from tiny_models import VOCAB, make_tiny_model  # noqa: E402


def stats_and_grads(model, fn):
    """fn() -> (logprobs, entropies); also the gradient of a fixed weighting of the logprobs."""
    model.zero_grad()
    logp, entropy = fn()
    (logp * torch.linspace(-1.0, 1.0, logp.numel())).sum().backward()
    return logp.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:  # summed over tokens in another order: relative to the gradient's size
        error = (a[2][name] - b[2][name]).norm() / a[2][name].norm()
        assert error < 1e-4, f"{name}: relative error {error:.2e}"


def random_ids(g, n):
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("prompt_len", [1, 2, 23])
def test_shared_prompt_equals_padded_batch(tmp_path, kind, prompt_len):
    make_tiny_model(kind, tmp_path, tokenizer=True)
    model, _ = load_policy(tmp_path)
    g = torch.Generator().manual_seed(prompt_len)
    prompt = random_ids(g, prompt_len)
    responses = [random_ids(g, n) for n in (7, 1, 12, 0, 5)]  # an empty response has no token to score
    padded = stats_and_grads(model, lambda: response_stats(model, pad_batch([prompt] * 5, responses, 0, "cpu"), 0.7))
    shared = stats_and_grads(model, lambda: shared_prompt_stats(model, prompt, responses, 0, 0.7))
    assert padded[0].shape == (25,)
    assert_same(padded, shared)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_micro_batch_of_several_prompts(tmp_path, share, checkpointing):
    """Runs of samples with one prompt share it; a chunk mixes prompts; checkpointing falls back to the padded batch."""
    make_tiny_model("llama", tmp_path, tokenizer=True)
    model, _ = load_policy(tmp_path, gradient_checkpointing=checkpointing)
    g = torch.Generator().manual_seed(0)
    p1, p2 = random_ids(g, 9), random_ids(g, 4)
    chunk = [TrainSample(p, random_ids(g, n), []) for p, n in ((p1, 3), (p1, 6), (p2, 2), (p2, 5), (p1, 4))]
    tcfg = SimpleNamespace(share_prompt=share)
    got = stats_and_grads(model, lambda: _stats(model, chunk, tcfg, 1.0, 0, "cpu"))
    batch = pad_batch([s.prompt_ids for s in chunk], [s.response_ids for s in chunk], 0, "cpu")
    want = stats_and_grads(model, lambda: response_stats(model, batch, 1.0))
    assert_same(want, got)
