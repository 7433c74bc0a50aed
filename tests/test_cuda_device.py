"""The CUDA path on a real GPU (marked `cuda`; skipped where torch sees none): the Triton kernels against torch,
flashinfer against a dense reference, the engine against transformers, sleep mode and the memory budget.
tools/gpu_device_run.py runs them on a lent machine (`pytest -m cuda`); bench/gpu_check.py measures the same
things at real shapes."""
import importlib.util
from pathlib import Path

import pytest
import torch

import ettrl_kernels
from tiny_models import make_tiny_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
CUDA = torch.device("cuda")
_spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).resolve().parents[1] / "bench" /
                                               "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def head_dim_64_model(directory: Path):
    """A tiny Llama whose head_dim (64) has flashinfer kernels (tiny_models' 16 has none); fp32, on the GPU."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=1024, initializer_range=0.2,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model.to(CUDA)


@torch.no_grad()
def greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=CUDA)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_sampler_matches_torch_and_is_batch_invariant(dtype):
    """Greedy, top-k, top-p, excluded-token and plain rows in one batch: the Triton kernel samples the tokens the
    torch path samples (on the GPU and on the CPU), and a row alone gives the bits it gives in the batch."""
    batch, vocab = 64, 151936
    logits = gpu_check.spiky_logits(batch, vocab, dtype, CUDA)
    keys = gpu_check.mixed_params(batch, vocab, CUDA)
    tokens, logprobs, entropies = ettrl_kernels.entropy_sample(logits, backend="triton", **keys)
    same_device = ettrl_kernels.entropy_sample(logits, backend="torch", **keys)
    cpu = ettrl_kernels.entropy_sample(logits.cpu(), backend="torch",
                                       **{k: v.cpu() if torch.is_tensor(v) else v for k, v in keys.items()})
    assert torch.equal(tokens, same_device[0]) and torch.equal(tokens.cpu(), cpu[0])
    torch.testing.assert_close(logprobs.cpu(), cpu[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropies.cpu(), cpu[2], rtol=1e-4, atol=1e-4)
    for i in (0, 2, 4, 6, 9, 63):
        alone = ettrl_kernels.entropy_sample(logits[i:i + 1], backend="triton",
                                             **gpu_check.row_params(keys, slice(i, i + 1)))
        assert all(torch.equal(a[0], b[i]) for a, b in zip(alone, (tokens, logprobs, entropies))), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_token_stats_match_torch(dtype):
    logits = (torch.randn(256, 151936, device=CUDA) * 3).to(dtype)
    targets = torch.randint(0, 151936, (256,), device=CUDA)
    results = []
    for backend in ("triton", "torch"):
        x = logits.clone().requires_grad_(True)
        logp, entropy = ettrl_kernels.token_stats(x, targets, temperature=0.7, backend=backend)
        logp.sum().backward()
        results.append((logp.detach(), entropy, x.grad.float()))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for mine, ref in zip(*results):
        torch.testing.assert_close(mine, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("head_dim, group", [(64, 7), (128, 4)])
def test_flashinfer_matches_a_dense_reference_and_decode_is_batch_invariant(head_dim, group):
    from engine.attention.flashinfer import FlashInferPagedAttention, flashinfer_usable
    usable, why = flashinfer_usable(CUDA, torch.bfloat16)
    assert usable, f"flashinfer is not usable on this machine: {why}"
    scale = head_dim ** -0.5
    for kv_lens, q_lens in (([5000, 37, 2600, 4097, 2048], [1] * 5), ([37, 2600, 129, 16], [37, 64, 129, 5])):
        k, v, tables, slots, q, new_k, new_v = gpu_check.scattered_batch(CUDA, torch.bfloat16, kv_lens, q_lens,
                                                                         group=group, head_dim=head_dim)
        attn = FlashInferPagedAttention.create(k, v, q.shape[1], scale, None)
        attn.plan(q_lens, kv_lens, tables, slots)
        out = attn(0, q, new_k, new_v)
        ref = gpu_check.dense_reference(k, v, tables, kv_lens, q_lens, q, scale)
        assert float((out.double() - ref).abs().max()) < 2e-2
        if max(q_lens) == 1:  # decode: a sequence alone gives the bits it gives in the batch (fixed split size)
            for i in range(len(kv_lens)):
                attn.plan([1], [kv_lens[i]], tables[i:i + 1], slots[i:i + 1])
                assert torch.equal(attn(0, q[i:i + 1], new_k[i:i + 1], new_v[i:i + 1]), out[i:i + 1]), kv_lens[i]


def test_engine_greedy_matches_transformers(tmp_path):
    """fp32 through the torch attention: token for token; bf16 through the auto choice, which must be flashinfer:
    each first token is transformers' fp32 argmax up to a bf16 near-tie."""
    from engine import LLM, SamplingParams
    model = head_dim_64_model(tmp_path)
    prompts = [list(range(10, 30)), list(range(40, 47)), list(range(100, 160))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(tmp_path, dtype="float32", device="cuda", kv_cache_tokens=4096, attention_backend="torch")
    assert [r.outputs[0].token_ids for r in llm.generate(prompts, params)] == [greedy(model, p, 12) for p in prompts]
    del llm
    llm = LLM(tmp_path, dtype="bfloat16", device="cuda", kv_cache_tokens=4096)
    assert type(llm.engine.runner.attn).__name__ == "FlashInferPagedAttention", "auto did not pick flashinfer"
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt], device=CUDA)).logits[0, -1].float(), -1)
        assert logp[out.outputs[0].token_ids[0]] >= logp.max() - 0.05


def test_sleep_level_2_gives_back_pool_and_weights(tmp_path):
    from engine import LLM, SamplingParams
    from engine.gpu_memory import parameter_bytes
    make_tiny_model("qwen2", tmp_path)
    llm = LLM(tmp_path, dtype="bfloat16", device="cuda", kv_cache_memory_gb=0.5)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    before = [r.outputs[0].token_ids for r in llm.generate([list(range(10, 30))], params)]
    runner = llm.engine.runner
    pool, weights = 2 * runner.kv.k.numel() * runner.kv.k.element_size(), parameter_bytes(runner.model)
    awake = torch.cuda.memory_allocated(CUDA)
    llm.sleep(level=2)
    assert awake - torch.cuda.memory_allocated(CUDA) >= 0.99 * pool + 0.9 * weights
    assert all(p.device.type == "cpu" and p.is_pinned() for p in runner.model.parameters())
    llm.wake_up(["weights"])
    assert all(p.device.type == "cuda" for p in runner.model.parameters()) and llm.engine.asleep
    llm.wake_up(["kv_cache"])
    assert [r.outputs[0].token_ids for r in llm.generate([list(range(10, 30))], params)] == before


def test_wake_up_refuses_when_the_memory_is_held(tmp_path):
    """After sleep() something takes the memory (a trainer's optimizer state): wake_up raises DeviceMemoryError
    and stays asleep; once it is freed, wake_up works."""
    from engine import LLM
    from engine.gpu_memory import DeviceMemoryError
    make_tiny_model("qwen2", tmp_path)
    llm = LLM(tmp_path, dtype="bfloat16", device="cuda", kv_cache_memory_gb=1.0)
    llm.sleep()
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info(CUDA)[0]
    hog = torch.empty(free - 512 * 2**20, dtype=torch.uint8, device=CUDA)  # leaves less than the 1 GiB pool
    with pytest.raises(DeviceMemoryError, match="wake_up needs"):
        llm.wake_up()
    assert llm.engine.asleep
    del hog
    llm.wake_up()
    assert not llm.engine.asleep


def test_gpu_memory_utilization_bounds_what_the_engine_holds(tmp_path):
    from engine import LLM, SamplingParams
    make_tiny_model("llama", tmp_path)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(CUDA)
    before = torch.cuda.memory_reserved(CUDA)
    llm = LLM(tmp_path, dtype="bfloat16", device="cuda", gpu_memory_utilization=0.2)
    llm.generate([list(range(5, 200))] * 8, SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True))
    held = torch.cuda.max_memory_reserved(CUDA) - before
    total = torch.cuda.get_device_properties(CUDA).total_memory
    assert 0.1 * total < held <= 0.2 * total
