"""Continuous batching, n>1 prompt sharing, prefix caching, preemption under a tiny KV pool, batch invariance."""
import pytest

from engine import LLM, SamplingParams, Sequence
from tiny_models import make_tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 100, 200], list(range(20, 57)), [42] * 17, list(range(60, 90))]
SAMPLED = SamplingParams(n=2, temperature=0.8, top_k=50, top_p=0.9, max_tokens=40, seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", path)
    return path


def run_checked(llm: LLM, prompts, params) -> list[list[list[int]]]:
    """Drives the engine step by step, checking the KV bookkeeping after every step."""
    engine = llm.engine
    requests = [engine.make_sequences(p, params) for p in prompts]
    for seqs in requests:
        engine.add_sequence(seqs[0])
    while engine.has_unfinished():
        for seq in engine.step():
            engine.free(seq)
        llm.check_integrity()
    return [[s.completion_token_ids for s in seqs] for seqs in requests]


def test_tiny_pool_preempts_and_gives_the_same_tokens(model_dir):
    big = LLM(model_dir, dtype="float32", block_size=4, num_kv_blocks=1024)
    small = LLM(model_dir, dtype="float32", block_size=4, num_kv_blocks=20)  # one 77-token sequence needs 20
    expected = [[c.token_ids for c in out.outputs] for out in big.generate(PROMPTS, SAMPLED)]
    assert run_checked(small, PROMPTS, SAMPLED) == expected
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.kv.allocator.num_free + small.engine.kv.tree.num_cached_blocks == 20


def test_no_prefix_caching_preempts_too(model_dir):
    big = LLM(model_dir, dtype="float32", block_size=4, num_kv_blocks=1024, enable_prefix_caching=False)
    small = LLM(model_dir, dtype="float32", block_size=4, num_kv_blocks=24, enable_prefix_caching=False)
    expected = [[c.token_ids for c in out.outputs] for out in big.generate(PROMPTS, SAMPLED)]
    assert run_checked(small, PROMPTS, SAMPLED) == expected
    assert small.engine.kv.allocator.num_free == 24


def test_seeded_request_is_batch_invariant(model_dir):
    llm = LLM(model_dir, dtype="float32", block_size=4)
    params = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_tokens=48, seed=7, ignore_eos=True)
    alone = llm.generate([PROMPTS[2]], params)[0]
    others = SamplingParams(n=5, temperature=0.9, max_tokens=30, seed=1, ignore_eos=True)
    batch = llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1]], [others, params, others])[1]
    assert [c.token_ids for c in batch.outputs] == [c.token_ids for c in alone.outputs]
    assert len({tuple(c.token_ids) for c in alone.outputs}) == 3  # the samples differ from each other


def test_n_samples_prefill_the_prompt_once(model_dir):
    llm = LLM(model_dir, dtype="float32", block_size=4, enable_prefix_caching=False)
    out = llm.generate([PROMPTS[2]], SamplingParams(n=6, temperature=1.0, max_tokens=20, seed=5, ignore_eos=True))[0]
    assert llm.engine.num_prefill_tokens == len(PROMPTS[2])
    assert llm.engine.num_decode_tokens == 6 * 19  # the first token of every sample comes from the prefill
    # sample j is the sequence with noise key (seed, j), however it was scheduled
    engine = llm.engine
    for j in (0, 4):
        seq = Sequence(PROMPTS[2], SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True), 5, seq_id=j)
        engine.add_sequence(seq)
        while engine.has_unfinished():
            engine.step()
        assert seq.completion_token_ids == out.outputs[j].token_ids
        engine.free(seq)


def test_prefix_cache_reuses_blocks_and_keeps_tokens(model_dir):
    llm = LLM(model_dir, dtype="float32", block_size=4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = llm.generate([PROMPTS[2]], params)[0].outputs[0].token_ids
    before = llm.engine.num_prefill_tokens
    second = llm.generate([PROMPTS[2]], params)[0].outputs[0].token_ids
    assert second == first
    assert llm.engine.num_prefill_tokens - before == len(PROMPTS[2]) - 36  # 9 cached blocks of 4 tokens
    llm.check_integrity()


def test_decode_batch_is_capped_by_max_num_seqs(model_dir):
    llm = LLM(model_dir, dtype="float32", block_size=4, max_num_seqs=3, num_kv_blocks=256)
    ref = LLM(model_dir, dtype="float32", block_size=4)
    got = run_checked(llm, PROMPTS, SAMPLED)
    assert got == [[c.token_ids for c in out.outputs] for out in ref.generate(PROMPTS, SAMPLED)]


@pytest.mark.parametrize("chunked", [True, False])
def test_full_batch_decodes_roots_before_forks(model_dir, chunked):
    """With more running sequences than max_num_seqs, a root (it may still be forked) is admitted and decodes
    at every step, while the forks take turns in the slots left."""
    llm = LLM(model_dir, dtype="float32", block_size=4, max_num_seqs=2, enable_chunked_prefill=chunked)
    engine = llm.engine
    params = SamplingParams(temperature=1.0, max_tokens=30, seed=3, ignore_eos=True)
    parent, root = engine.make_sequences(PROMPTS[0], params)[0], engine.make_sequences(PROMPTS[1], params)[0]
    engine.add_sequence(parent)
    engine.step()
    forks = [engine.fork(parent, len(parent), params, 3, seq_id=10 + i) for i in range(2)]
    engine.free(parent)
    engine.add_sequence(root)
    engine.step()  # the batch is full of forks, and the root is still admitted: it prefills now
    # chunked: one fork decodes beside the root's prefill; else the prefill has the step to itself
    assert root.num_completion_tokens == 1 and [f.num_completion_tokens for f in forks] == [1 + chunked, 1]
    for _ in range(4):
        engine.step()
        llm.check_integrity()
    assert root.num_completion_tokens == 5
    assert [f.num_completion_tokens for f in forks] == [3 + chunked, 3]  # the second slot alternates
