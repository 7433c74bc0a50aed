"""Chunked prefill: decodes and prompt pieces share steps under a token budget (decodes first), pieces end at
multiples of the chunk size from the start of the sequence whatever the load, a long prompt leaves room for queued
short ones, and a seeded request's tokens do not depend on any of it (against the engine without chunking)."""
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from staggered import drive
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", path)
    return path


def tiny_llm(model_dir, num_kv_blocks: int = 512, **options) -> LLM:
    """Pacing off unless asked (it spaces long prompts' pieces by wall time, so step plans would depend on the
    machine's load; tests/test_prefill_pacing.py runs it on a modeled clock)."""
    options.setdefault("decode_share", 0.0)
    return LLM(model_dir, dtype="bfloat16", block_size=4, num_kv_blocks=num_kv_blocks, **options)


def record_steps(llm: LLM) -> list[list[tuple[int, int, int, bool, int]]]:
    """Wraps the scheduler: each step's [(uid, first token computed, tokens computed, is a decode, length)]."""
    steps, schedule = [], llm.engine.scheduler.schedule

    def spy():
        seqs, num_decodes = schedule()
        steps.append([(s.uid, s.num_cached_tokens, s.num_scheduled_tokens, i < num_decodes, len(s))
                      for i, s in enumerate(seqs)])
        return seqs, num_decodes
    llm.engine.scheduler.schedule = spy
    return steps


def reference(model_dir, arrivals):
    """Each request alone in an engine without chunked prefill."""
    llm = tiny_llm(model_dir, enable_chunked_prefill=False)
    out = []
    for _, prompt, params in arrivals:
        llm.engine.kv.reset_prefix_cache()
        out.append([(c.token_ids, c.logprobs) for c in llm.generate([prompt], params)[0].outputs])
    return out


PARAMS = SamplingParams(n=2, temperature=0.9, max_tokens=12, seed=5, ignore_eos=True)
LONG = [(11 * i + 5) % 300 for i in range(150)]


def test_config_defaults_and_checks():
    cpu = EngineConfig(model="m", device="cpu")
    assert cpu.enable_chunked_prefill and cpu.max_num_batched_tokens == 256 and cpu.long_prefill_token_threshold == 16
    cuda = EngineConfig(model="m", device="cuda")
    assert cuda.max_num_batched_tokens == 8192 and cuda.long_prefill_token_threshold == 512
    assert EngineConfig(model="m", device="cpu", max_num_batched_tokens=16).long_prefill_token_threshold == 16
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        EngineConfig(model="m", device="cpu", max_num_batched_tokens=64, long_prefill_token_threshold=65)


def test_pieces_end_on_the_chunk_grid_whatever_the_load(model_dir):
    """A 150-token prompt alone, beside running decodes and queued prompts, and over a cached prefix: every piece
    ends at a multiple of the chunk size (8) or at the prompt's end, and the tokens are those without chunking."""
    expected = reference(model_dir, [(0, LONG, PARAMS)])[0]
    for load in ("alone", "decodes", "queue", "cached"):
        llm = tiny_llm(model_dir, max_num_batched_tokens=40, long_prefill_token_threshold=8)
        steps = record_steps(llm)
        arrivals = [(0, LONG, PARAMS)]
        if load == "decodes":
            arrivals = [(0, [1, 2, 3], SamplingParams(n=3, max_tokens=40, seed=1, ignore_eos=True)), (2, LONG, PARAMS)]
        elif load == "queue":
            arrivals += [(i % 3, [7 + i] * (5 + 3 * i), SamplingParams(max_tokens=4, seed=i)) for i in range(8)]
        elif load == "cached":
            drive(llm, [(0, LONG[:77], SamplingParams(max_tokens=1))])  # 19 full blocks of 4 cached
        got = drive(llm, arrivals)
        long_index = 1 if load == "decodes" else 0
        assert got[long_index] == expected, load
        uid = next(uid for step in steps for uid, start, n, *_ in step if start + n == len(LONG))
        pieces = [(start, n) for step in steps for u, start, n, decode, _ in step if u == uid and not decode]
        ends = [start + n for start, n in pieces]
        assert all(end % 8 == 0 or end == len(LONG) for end in ends), (load, pieces)
        assert ends[-1] == len(LONG) and all(a < b for a, b in zip(ends, ends[1:]))
        if load == "alone":
            assert [n for _, n in pieces] == [40, 40, 40, 30]  # nothing else: the whole budget, on the grid
        if load == "cached":
            assert pieces[0][0] == 76


def test_decodes_first_and_the_budget_holds(model_dir):
    """Every running decode gets its token in every step of a long prefill, and a step computes at most
    max(max_num_batched_tokens, decodes + one chunk) tokens."""
    llm = tiny_llm(model_dir, max_num_batched_tokens=24, long_prefill_token_threshold=8)
    steps = record_steps(llm)
    arrivals = [(0, [9, 8, 7], SamplingParams(n=4, max_tokens=60, seed=2, ignore_eos=True)), (3, LONG, PARAMS),
                (5, LONG[:40], PARAMS)]
    drive(llm, arrivals)
    samples = {uid for uid, _, _, decode, _ in steps[2] if decode}
    assert len(samples) == 4
    long_uid = next(uid for step in steps for uid, start, n, *_ in step if start + n == len(LONG))
    prefilling = [step for step in steps if any(uid == long_uid and not decode for uid, _, _, decode, _ in step)]
    assert len(prefilling) > 10
    for step in prefilling:
        decodes = [decode for _, _, _, decode, _ in step]
        assert samples <= {uid for uid, _, n, decode, _ in step if decode and n == 1}  # they never wait for it
        assert decodes == sorted(decodes, reverse=True)
        assert sum(n for _, _, n, _, _ in step) <= max(24, sum(decodes) + 8)


def test_a_short_prompt_prefills_beside_a_long_one(model_dir):
    """A long prompt takes at most long_prefill_token_threshold tokens of a step while a short prompt waits
    behind it, so the short one is prefilled (and samples) in the same step."""
    llm = tiny_llm(model_dir, max_num_batched_tokens=64, long_prefill_token_threshold=16)
    steps = record_steps(llm)
    drive(llm, [(0, LONG, PARAMS), (0, [4, 5, 6, 7, 8], SamplingParams(max_tokens=3, seed=0))])
    assert [(start, n) for _, start, n, _, _ in steps[0]] == [(0, 16), (0, 5)]


def test_chunked_prefill_off_keeps_separate_steps(model_dir):
    llm = tiny_llm(model_dir, enable_chunked_prefill=False, max_num_batched_tokens=64)
    steps = record_steps(llm)
    drive(llm, [(0, [9, 8, 7], SamplingParams(n=2, max_tokens=10, seed=2, ignore_eos=True)), (2, LONG, PARAMS)])
    for step in steps:
        assert len({decode for _, _, _, decode, _ in step}) == 1  # a step is all decodes or all prefill
    assert any(n == len(LONG) for step in steps for _, _, n, _, _ in step)  # the whole prompt in one step


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), budget=st.sampled_from([8, 13, 40, 512]), threshold=st.sampled_from([0, 4, 8]),
       max_num_seqs=st.sampled_from([3, 64]), pool=st.sampled_from([60, 2048]))
def test_random_traffic_keeps_every_invariant(model_dir, seed, budget, threshold, max_num_seqs, pool):
    """Random staggered traffic with shared prefixes under random budgets, thresholds, batch caps and pool sizes:
    after every step the KV bookkeeping is whole and the step kept its limits; every request finishes with the
    tokens and log-probabilities it gets alone without chunking."""
    rng = random.Random(seed)
    stem = [rng.randrange(300) for _ in range(60)]
    arrivals = [(rng.randrange(12), stem[:rng.randrange(1, 60)] + [rng.randrange(300) for _ in range(rng.randrange(4))],
                 SamplingParams(n=rng.choice([1, 3]), temperature=0.8, max_tokens=rng.randrange(1, 12),
                                seed=rng.randrange(99), ignore_eos=True)) for _ in range(8)]
    threshold = min(threshold, budget)
    llm = tiny_llm(model_dir, num_kv_blocks=pool, max_num_batched_tokens=budget,
              long_prefill_token_threshold=threshold, max_num_seqs=max_num_seqs)
    steps = record_steps(llm)
    chunk = threshold or budget

    def check():
        step = steps[-1]
        decodes = sum(decode for _, _, _, decode, _ in step)
        assert len(step) <= max_num_seqs
        assert sum(n for _, _, n, _, _ in step) <= max(budget, decodes + chunk)
        assert all(n == 1 for _, _, n, decode, _ in step if decode)
        assert all((start + n) % chunk == 0 or start + n == length for _, start, n, _, length in step)
    assert drive(llm, arrivals) == reference(model_dir, arrivals)
    assert llm.engine.kv.allocator.num_free + llm.engine.kv.tree.num_cached_blocks == llm.engine.kv.num_blocks


class FlashInferSemantics:
    """A stand-in for flashinfer's paged prefill and decode wrappers that computes what their documentation says
    (NHD pages, the last page holding last_page_len keys, causal queries aligned with the end of their keys, query
    head h on KV head h // group), in float64: our backend's plan arguments must describe the batch to it."""

    def __init__(self, workspace, layout, **kwargs):
        assert layout == "NHD"

    def plan(self, *args, **kwargs):
        # prefill: qo_indptr, then as decode: kv_indptr, kv_indices, last_page_len, heads, kv heads, dim, page
        self.qo_indptr, args = (args[0], args[1:]) if len(args) == 8 else (None, args)
        self.kv_indptr, self.kv_indices, self.last, self.heads, _, _, self.page = args
        self.scale, self.causal = kwargs["sm_scale"], kwargs.get("causal", True)

    def run(self, q, cache):
        k_cache, v_cache = cache
        batch = len(self.kv_indptr) - 1
        qo = self.qo_indptr.tolist() if self.qo_indptr is not None else list(range(batch + 1))
        out = torch.empty(q.shape, dtype=torch.float64)
        for i in range(batch):
            pages = self.kv_indices[self.kv_indptr[i]:self.kv_indptr[i + 1]].long()
            n = (len(pages) - 1) * self.page + int(self.last[i])
            keys, values = (c[pages].reshape(-1, *c.shape[2:])[:n].double() for c in (k_cache, v_cache))
            group = self.heads // keys.shape[1]
            keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
            rows = q[qo[i]:qo[i + 1]].double()
            scores = torch.einsum("qhd,khd->hqk", rows, keys) * self.scale
            pos = torch.arange(n - len(rows), n)[:, None]
            scores = scores.masked_fill(torch.arange(n)[None, :] > pos, float("-inf"))
            out[qo[i]:qo[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
        return out.to(q.dtype)


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [1, 1, 7, 3, 1], [5, 1, 9]])
def test_flashinfer_plans_mixed_and_chunked_steps(monkeypatch, query_lens):
    """Decodes, prompt pieces over cached keys and whole prompts in one step: the flashinfer backend's plan and
    cache writes (through the stand-in) give the attention of the torch backend."""
    import test_cuda_path

    from engine.attention.torch_paged import TorchPagedAttention
    fi = test_cuda_path.use_fake_flashinfer(monkeypatch, FlashInferSemantics)
    heads, kv_heads, dim, page = 4, 2, 8, 4
    kv_lens = [n + 4 * i + 3 for i, n in enumerate(query_lens)]
    gen = torch.Generator().manual_seed(len(query_lens))
    pool = torch.randn(2, 40, page, kv_heads, dim, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    order = torch.randperm(40, generator=gen).tolist()
    tables, start = [], 0
    for n in kv_lens:
        tables.append(order[start:start - (-n // page)])
        start += len(tables[-1])
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    slots = torch.tensor([t[p // page] * page + p % page for t, n, m in zip(tables, kv_lens, query_lens)
                          for p in range(n - m, n)])
    rows = sum(query_lens)
    q = torch.randn(rows, heads, dim, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(rows, kv_heads, dim, generator=gen).to(torch.bfloat16) for _ in range(2))
    flash = fi.FlashInferPagedAttention(pool.clone(), pool.flip(0).clone(), heads, dim ** -0.5)
    ref = TorchPagedAttention(pool.clone(), pool.flip(0).clone(), heads, dim ** -0.5, use_decode_kernel=False,
                              fuse_rope=False)
    for attn in (flash, ref):
        attn.plan(query_lens, kv_lens, block_tables, slots)
    assert flash.is_decode == (max(query_lens) == 1)
    for layer in (0, 1):
        torch.testing.assert_close(flash(layer, q, k, v).float(), ref(layer, q, k, v).float(), atol=2e-2, rtol=2e-2)
