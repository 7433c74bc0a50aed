"""CPU-visible parts of the CUDA-path fixes (issue 20): bf16 temperature, imports without the extension,
device defaults, flashinfer fallbacks, Triton device guards."""
import torch

import ettrl_kernels


def test_bf16_uniform_temperature_scales_in_float32():
    """A scalar temperature on bf16 logits gives what a per-row one gives (x = logits.float() / T in fp32)."""
    torch.manual_seed(0)
    logits = (torch.randn(16, 8192) * 4).to(torch.bfloat16)
    keys = {"seeds": 3, "seq_ids": torch.arange(16), "positions": 5}
    tokens, logprobs, entropies = ettrl_kernels.entropy_sample(logits, temperature=0.6, backend="torch", **keys)
    per_row = torch.full((16,), 0.6)
    ref_tokens, ref_logprobs, ref_entropies = ettrl_kernels.entropy_sample(logits, temperature=per_row,
                                                                           backend="torch", **keys)
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(logprobs, ref_logprobs) and torch.equal(entropies, ref_entropies)
    exact = torch.log_softmax(logits.double() / 0.6, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs.double(), exact, rtol=0, atol=1e-4)
