"""The seed contract under load: a seeded request samples exactly the tokens it samples alone when it joins a
running batch late (a prefill beside running decodes, a prefix-cache hit on a prompt still in flight or finished,
n > 1 siblings, preemption and recomputation under a small KV pool), with chunked prefill and without."""
import random

import pytest

from engine import LLM, SamplingParams
from staggered import drive
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", path)
    return path


def staggered_requests(seed: int, count: int) -> list[tuple[int, list[int], SamplingParams]]:
    """(arrival step, prompt, params): prompts cut from three shared prefixes plus a private tail, so the radix
    cache hits prompts that are still prefilling, decoding or already finished."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(300) for _ in range(rng.randrange(20, 120))] for _ in range(3)]
    requests = []
    for _ in range(count):
        prompt = rng.choice(prefixes)[:rng.randrange(1, 130)] + [rng.randrange(300) for _ in range(rng.randrange(5))]
        params = SamplingParams(n=rng.choice([1, 2, 4]), temperature=0.8, max_tokens=rng.randrange(4, 24),
                                seed=rng.randrange(1000), ignore_eos=True, logprobs=1)
        requests.append((rng.randrange(0, 40), prompt, params))
    return requests


def outputs(seqs) -> list[tuple[list[int], list[float]]]:
    return [(s.completion_token_ids, s.logprobs) for s in seqs]


def alone(llm: LLM, prompt: list[int], params: SamplingParams):
    llm.engine.kv.reset_prefix_cache()
    return [(c.token_ids, c.logprobs) for c in llm.generate([prompt], params)[0].outputs]


def run_staggered(llm: LLM, requests) -> list:
    """Adds each request at its arrival step while the others run; checks the KV bookkeeping after every step."""
    llm.engine.kv.reset_prefix_cache()
    return drive(llm, requests)


@pytest.mark.parametrize("dtype,pool,chunked", [  # pool 90 blocks of 4: sequences are preempted and recomputed
    ("bfloat16", None, True), ("float32", None, True), ("bfloat16", 90, True), ("float32", 90, True),
    ("bfloat16", 90, False)])
def test_late_joiners_sample_as_alone(model_dir, dtype, pool, chunked):
    """Tokens and log-probabilities (so the logits, bit for bit) of every request equal its run alone."""
    llm = LLM(model_dir, dtype=dtype, block_size=4, num_kv_blocks=pool or 2048, enable_chunked_prefill=chunked)
    requests = staggered_requests(seed=0, count=16)
    expected = [alone(llm, prompt, params) for _, prompt, params in requests]
    got = run_staggered(llm, requests)
    bad = [i for i in range(len(requests)) if got[i] != expected[i]]
    assert not bad, f"requests {bad} sampled differently when they joined the running batch"
    if pool:
        assert llm.engine.scheduler.num_preemptions > 0


def test_prefill_over_a_cached_prefix_gives_the_full_prefill_logits(model_dir):
    """The logits of a prompt prefilled over a cached prefix (cut anywhere) equal those of its full prefill."""
    llm = LLM(model_dir, dtype="bfloat16", block_size=4, num_kv_blocks=512)
    prompt = [(7 * i + 3) % 300 for i in range(61)]
    params = SamplingParams(temperature=0.8, max_tokens=6, seed=3, ignore_eos=True, logprobs=3)
    llm.engine.kv.reset_prefix_cache()
    full = llm.generate([prompt], params)[0].outputs[0]
    for cut in (1, 4, 13, 32, 57):
        llm.engine.kv.reset_prefix_cache()
        llm.generate([prompt[:cut]], SamplingParams(max_tokens=1, temperature=0))
        before = llm.engine.num_prefill_tokens
        hit = llm.generate([prompt], params)[0].outputs[0]
        assert llm.engine.num_prefill_tokens - before < len(prompt) - (cut // 4 * 4) + 6
        assert (hit.token_ids, hit.logprobs, hit.entropies) == (full.token_ids, full.logprobs, full.entropies)
