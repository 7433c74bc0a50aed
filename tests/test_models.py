"""The engine's own Llama / Qwen2 / Qwen3 implementations against transformers on tiny random checkpoints."""
import pytest
import torch

from engine import LLM, SamplingParams, resolve_model
from tiny_models import CONFIGS, hf_greedy, hf_token_stats, make_tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 100, 200], list(range(20, 57)), [42] * 17]
NEW_TOKENS = 64


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_model(request.param, path)
    llm = LLM(path, dtype="float32", block_size=4, num_kv_blocks=512)
    return hf, llm


def test_greedy_matches_transformers(tiny):
    hf, llm = tiny
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    for prompt, out, ref in zip(PROMPTS, outs, hf_greedy(hf, PROMPTS, NEW_TOKENS)):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_and_entropies_match_transformers_logits(tiny, temperature):
    hf, llm = tiny
    params = SamplingParams(n=2, temperature=temperature, top_p=0.9, max_tokens=24, seed=3, ignore_eos=True)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params)):
        for sample in out.outputs:
            logprobs, entropies = hf_token_stats(hf, prompt, sample.token_ids, temperature)
            torch.testing.assert_close(torch.tensor(sample.logprobs), logprobs, atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.tensor(sample.entropies), entropies, atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    hf = make_tiny_model("llama", tmp_path / "single")
    make_tiny_model("llama", tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    llm = LLM(tmp_path / "sharded", dtype="float32")
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(hf, PROMPTS[:1], 16)[0]


def test_bfloat16_logits_stay_close_to_fp32(tmp_path):
    hf = make_tiny_model("qwen3", tmp_path)
    llm = LLM(tmp_path, dtype="bfloat16")
    out = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    logprobs, entropies = hf_token_stats(hf, PROMPTS[2], out.token_ids, 0.0)
    torch.testing.assert_close(torch.tensor(out.entropies), entropies, atol=0.05, rtol=0.02)
    torch.testing.assert_close(torch.tensor(out.logprobs), logprobs, atol=0.05, rtol=0.02)


@pytest.mark.integration
def test_default_model_fp32_greedy_matches_transformers():
    from transformers import AutoModelForCausalLM
    path = resolve_model("smollm2-135m-instruct")
    llm = LLM(path, dtype="float32", kv_cache_tokens=4096)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}])
               for q in ("What is 7 times 8?", "Name three primary colors.")]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    refs = hf_greedy(hf, [out.prompt_token_ids for out in outs], NEW_TOKENS)
    assert [out.outputs[0].token_ids for out in outs] == refs
