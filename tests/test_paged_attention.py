"""Paged attention on the CPU: the C++ decode and prefill kernels and the torch path against dense attention per
sequence; the prefill kernel against the decode kernel bit for bit."""
import pytest
import torch

from engine.attention.torch_paged import TorchPagedAttention, decode_kernel

TOLERANCE = {torch.float32: dict(atol=2e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def dense_reference(q, keys, values, scale):
    """q [H, D] (one new token) against keys/values [L, Hkv, D], in float64 with repeated KV heads."""
    group = q.shape[0] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1).transpose(0, 1)
    v = values.double().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = (q.double()[:, None, :] @ k.transpose(1, 2)).squeeze(1) * scale
    return (torch.softmax(scores, -1)[:, None, :] @ v).squeeze(1)


def random_pool(lens, block_size, heads, kv_heads, dim, dtype, seed):
    """A shuffled block pool holding each sequence's keys, the block tables, and each sequence's dense K/V."""
    g = torch.Generator().manual_seed(seed)
    nblocks = [-(-n // block_size) for n in lens]
    order = torch.randperm(sum(nblocks) + 3, generator=g).tolist()  # blocks scattered through the pool
    k_cache = torch.randn(1, len(order), block_size, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(1, len(order), block_size, kv_heads, dim, generator=g).to(dtype)
    tables, start = [], 0
    for n in nblocks:
        tables.append(order[start:start + n])
        start += n
    width = max(nblocks)
    table_tensor = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    dense = []
    for t, n in zip(tables, lens):
        dense.append((k_cache[0, t].reshape(-1, kv_heads, dim)[:n], v_cache[0, t].reshape(-1, kv_heads, dim)[:n]))
    q = torch.randn(len(lens), heads, dim, generator=g).to(dtype)
    return k_cache, v_cache, table_tensor, dense, q


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_kernel", [True, False])
# kv heads of 3, 1, 4, 12 and 7 query heads: the AVX-512 kernel updates them in runs of up to 256 / dim (3; 1; 2 + 2;
# 4 + 4 + 4; 4 + 3)
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (12, 1, 64), (14, 2, 64)])
@pytest.mark.parametrize("block_size", [16, 4, 12])  # 12: not a power of two, the AVX-512 path hands it on
def test_decode_attention_matches_dense(dtype, use_kernel, heads, kv_heads, dim, block_size):
    lens, scale = [1, 5, 16, 17, 70, 33], dim ** -0.5
    k_cache, v_cache, tables, dense, q = random_pool(lens, block_size, heads, kv_heads, dim, dtype, seed=dim + heads)
    used = torch.zeros(k_cache.shape[1] * block_size, dtype=torch.bool)
    for t, n in zip(tables.tolist(), lens):
        used[[t[p // block_size] * block_size + p % block_size for p in range(n)]] = True
    for cache in (k_cache, v_cache) if use_kernel else ():  # the kernel must never read a slot no sequence owns
        cache.view(-1, kv_heads, dim)[~used] = float("nan")  # (the torch path reads padding from slot 0, masked)
    if use_kernel and decode_kernel(k_cache) is None:
        pytest.skip("C++ extension not built (ettrl_kernels._C has no paged_decode_attention)")
    attn = TorchPagedAttention(k_cache, v_cache, heads, scale, use_decode_kernel=use_kernel)
    assert (attn.kernel is not None) == use_kernel
    # the new token's K/V: rewrite what the pool already holds at each sequence's last slot
    last = torch.tensor([t[(n - 1) // block_size] * block_size + (n - 1) % block_size
                         for t, n in zip(tables.tolist(), lens)])
    new_k = torch.stack([k[-1] for k, _ in dense])
    new_v = torch.stack([v[-1] for _, v in dense])
    attn.plan([1] * len(lens), lens, tables, last)
    out = attn(0, q, new_k, new_v).view(len(lens), heads, dim)
    for i, (keys, values) in enumerate(dense):
        torch.testing.assert_close(out[i].double(), dense_reference(q[i], keys, values, scale), **TOLERANCE[dtype])


def test_decode_kernel_equals_torch_path_in_the_engine(tmp_path):
    from engine import LLM, SamplingParams
    from tiny_models import make_tiny_model

    make_tiny_model("llama", tmp_path)
    prompts = [[5, 6, 7, 8], list(range(30, 70)), [9] * 21]
    params = SamplingParams(n=3, temperature=0.8, max_tokens=40, seed=2, ignore_eos=True)
    outs = []
    for use_kernel in (True, False):
        llm = LLM(tmp_path, dtype="float32", block_size=4)
        assert llm.engine.runner.attn.kernel is not None  # fp32 on the CPU: the C++ decode kernel by default
        if not use_kernel:
            llm.engine.runner.attn.kernel = None
        outs.append(llm.generate(prompts, params))
    for a, b in zip(*outs):
        for x, y in zip(a.outputs, b.outputs):
            assert x.token_ids == y.token_ids
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4, rtol=0)


KERNEL_SWITCHES = {  # environment -> the kernel a CPU without that instruction set runs (read once per process)
    "ETTRL_NO_AVX512": "the portable two-pass kernel",
    "ETTRL_NO_AVX512_BF16": "the AVX-512 tiles with fp32 q.k for bf16 caches (no vdpbf16ps)",
}


@pytest.mark.parametrize("switch", sorted(KERNEL_SWITCHES))
def test_kernel_variants_match_dense(switch):
    """Each kernel a CPU may run, on this one: dense agreement and bit-exact batch invariance."""
    import os
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, 'tests'); import test_paged_attention as t, torch; "
            "[t.test_decode_attention_matches_dense(d, True, *shape, bs) for d in (torch.float32, torch.bfloat16) "
            "for shape in ((9, 3, 64), (4, 4, 32), (8, 2, 128), (14, 2, 64)) for bs in (16, 4)]; "
            "[t.test_shared_prefix_attention_matches_dense(d, 9, 3, 64, 16, c) "
            "for d in (torch.float32, torch.bfloat16) "
            "for c in range(len(t.SHARED_CASES))]; "
            "[t.test_shared_prefix_attention_is_batch_invariant(d, *shape) for d in (torch.float32, torch.bfloat16) "
            "for shape in ((9, 3, 64), (14, 2, 64))]; "
            "[t.test_prefill_rows_equal_decode_rows(d, *shape, bs, step) for d in (torch.float32, torch.bfloat16) "
            "for shape in ((9, 3, 64), (4, 4, 32), (8, 2, 128)) for bs in (16, 4) for step in t.PIECE_STEPS]")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, switch: "1"}, check=True, timeout=300)


def shared_prefix_pool(lens, shared_blocks, block_size, heads, kv_heads, dim, dtype, seed):
    """Block tables whose first shared_blocks[i] blocks are those of sequence 0 (the n samples of a prompt, a
    tree's branches); other blocks are private and scattered. Block 0 is a real block of sequence 0, so table
    padding (also 0) must never count as shared."""
    g = torch.Generator().manual_seed(seed)
    nblocks = [-(-n // block_size) for n in lens]
    owned = [nblocks[0]] + [n - s for n, s in zip(nblocks[1:], shared_blocks[1:])]
    pool = sum(owned) + 2
    order = [0] + (torch.randperm(pool - 1, generator=g) + 1).tolist()
    k_cache = torch.randn(1, pool, block_size, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(1, pool, block_size, kv_heads, dim, generator=g).to(dtype)
    tables, start = [order[:nblocks[0]]], nblocks[0]
    for n, s in zip(nblocks[1:], shared_blocks[1:]):
        tables.append(tables[0][:s] + order[start:start + n - s])
        start += n - s
    width = max(nblocks)
    table_tensor = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    dense = [(k_cache[0, t].reshape(-1, kv_heads, dim)[:n], v_cache[0, t].reshape(-1, kv_heads, dim)[:n])
             for t, n in zip(tables, lens)]
    q = torch.randn(len(lens), heads, dim, generator=g).to(dtype)
    return k_cache, v_cache, table_tensor, dense, q


def run_kernel(k_cache, v_cache, tables, lens, q, heads, kv_heads, dim, block_size):
    from ettrl_kernels import _C

    out = torch.empty_like(q)
    k, v = k_cache[0].reshape(-1, kv_heads * dim), v_cache[0].reshape(-1, kv_heads * dim)
    tables, kv_lens = tables.contiguous(), torch.tensor(lens, dtype=torch.int64)
    _C.paged_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), tables.data_ptr(),
                              kv_lens.data_ptr(), len(lens), heads, kv_heads, dim, tables.shape[1], block_size,
                              dim ** -0.5, q.dtype == torch.bfloat16, 2)
    return out


SHARED_CASES = [  # (kv lengths, leading blocks each shares with sequence 0): samples of one prompt, tree branches
    ([150, 150, 149, 151, 200, 40, 33, 7], [0, 9, 9, 9, 9, 2, 2, 0]),
    ([64, 65, 64, 90, 17], [0, 4, 4, 3, 1]),
    ([31, 40], [0, 1]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (8, 2, 128)])
@pytest.mark.parametrize("block_size", [16, 4, 32])
@pytest.mark.parametrize("case", range(len(SHARED_CASES)))
def test_shared_prefix_attention_matches_dense(dtype, heads, kv_heads, dim, block_size, case):
    """Sequences that share leading KV blocks (read once per group by the AVX-512 kernel) get exact attention."""
    if decode_kernel(torch.empty(1, dtype=dtype)) is None:
        pytest.skip("C++ extension not built (ettrl_kernels._C has no paged_decode_attention)")
    lens, shared = SHARED_CASES[case]
    shared = [min(s * 16 // block_size, -(-n // block_size)) for s, n in zip(shared, lens)]
    k_cache, v_cache, tables, dense, q = shared_prefix_pool(lens, shared, block_size, heads, kv_heads, dim, dtype,
                                                            seed=case + dim)
    out = run_kernel(k_cache, v_cache, tables, lens, q, heads, kv_heads, dim, block_size)
    for i, (keys, values) in enumerate(dense):
        torch.testing.assert_close(out[i].double(), dense_reference(q[i], keys, values, dim ** -0.5),
                                   **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (14, 2, 64), (8, 2, 128)])
def test_shared_prefix_attention_is_batch_invariant(dtype, heads, kv_heads, dim):
    """Bit for bit: a sequence's output is the same alone, in a group that shares its prefix, and in any order."""
    if decode_kernel(torch.empty(1, dtype=dtype)) is None:
        pytest.skip("C++ extension not built (ettrl_kernels._C has no paged_decode_attention)")
    block_size = 16
    lens, shared = SHARED_CASES[0]
    k_cache, v_cache, tables, _, q = shared_prefix_pool(lens, shared, block_size, heads, kv_heads, dim, dtype, seed=5)
    together = run_kernel(k_cache, v_cache, tables, lens, q, heads, kv_heads, dim, block_size)
    for i in range(len(lens)):
        alone = run_kernel(k_cache, v_cache, tables[i:i + 1], lens[i:i + 1], q[i:i + 1], heads, kv_heads, dim,
                           block_size)
        assert torch.equal(alone[0], together[i]), f"sequence {i} differs alone and in the batch"
    perm = torch.randperm(len(lens), generator=torch.Generator().manual_seed(0))
    shuffled = run_kernel(k_cache, v_cache, tables[perm], [lens[i] for i in perm], q[perm].contiguous(), heads,
                          kv_heads, dim, block_size)
    assert torch.equal(shuffled, together[perm])


def run_prefill_kernel(k_cache, v_cache, tables, lens, query_lens, q, heads, kv_heads, dim, block_size):
    from ettrl_kernels import _C

    out = torch.empty_like(q)
    k, v = k_cache[0].reshape(-1, kv_heads * dim), v_cache[0].reshape(-1, kv_heads * dim)
    tables, kv_lens = tables.contiguous(), torch.tensor(lens, dtype=torch.int64)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int64)
    _C.paged_prefill_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), tables.data_ptr(),
                               starts.data_ptr(), kv_lens.data_ptr(), len(lens), heads, kv_heads, dim, tables.shape[1],
                               block_size, dim ** -0.5, q.dtype == torch.bfloat16, 2)
    return out


PREFILL_LENS = [1, 5, 16, 17, 70, 33, 200]   # keys per sequence after the step
PREFILL_ROWS = [1, 5, 3, 17, 70, 1, 37]      # new tokens (query rows): whole prompts, chunks over a cached prefix
# Steps with fewer 16-row tasks than the workers can share, whose tasks the kernel cuts by query heads: a 16-token
# piece of a long prompt alone, and beside two decodes.
PIECE_STEPS = {"mixed": (PREFILL_LENS, PREFILL_ROWS), "piece": ([300], [16]),
               "piece+decodes": ([9, 300, 40], [1, 16, 1])}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (14, 2, 64)])
@pytest.mark.parametrize("block_size", [16, 4])
@pytest.mark.parametrize("step", list(PIECE_STEPS))
def test_prefill_rows_equal_decode_rows(dtype, heads, kv_heads, dim, block_size, step):
    """Every query row of the prefill kernel is, bit for bit, the decode kernel's result for one query at that
    position (alone), and near dense attention over the keys up to it: a token's attention does not depend on
    where its prefill starts, how it is split, or what else is in the step."""
    if decode_kernel(torch.empty(1, dtype=dtype), "paged_prefill_attention") is None:
        pytest.skip("C++ extension not built (ettrl_kernels._C has no paged_prefill_attention)")
    lens, query_rows = PIECE_STEPS[step]
    k_cache, v_cache, tables, dense, _ = random_pool(lens, block_size, heads, kv_heads, dim, dtype, seed=dim)
    rows = sum(query_rows)
    q = torch.randn(rows, heads, dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = run_prefill_kernel(k_cache, v_cache, tables, lens, query_rows, q, heads, kv_heads, dim, block_size)
    r = 0
    for b, (n, new) in enumerate(zip(lens, query_rows)):
        for i in range(new):
            keys = n - new + i + 1
            alone = run_kernel(k_cache, v_cache, tables[b:b + 1], [keys], q[r:r + 1], heads, kv_heads, dim, block_size)
            assert torch.equal(out[r], alone[0]), f"row {i} of sequence {b} differs from its decode"
            ref = dense_reference(q[r], dense[b][0][:keys], dense[b][1][:keys], dim ** -0.5)
            torch.testing.assert_close(out[r].double(), ref, **TOLERANCE[dtype])
            r += 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_step_in_the_backend_equals_the_torch_path(dtype):
    """A step of decodes and prefill rows through cpu_paged's plan (decode kernel, then prefill kernel) against
    the gather + SDPA reference, and its decode rows bit for bit against a decode-only step."""
    heads, kv_heads, dim, block_size = 9, 3, 64, 4
    lens, query_lens = [9, 40, 3, 70, 33], [1, 1, 3, 20, 1]  # two decodes, a prompt, a chunk, a last token
    k_cache, v_cache, tables, _, _ = random_pool(lens, block_size, heads, kv_heads, dim, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    rows = sum(query_lens)
    q = torch.randn(rows, heads, dim, generator=g).to(dtype)
    k, v = (torch.randn(rows, kv_heads, dim, generator=g).to(dtype) for _ in range(2))
    slots = torch.tensor([t[p // block_size] * block_size + p % block_size
                          for t, n, m in zip(tables.tolist(), lens, query_lens) for p in range(n - m, n)])
    outs = {}
    for use_kernel in (True, False):
        attn = TorchPagedAttention(k_cache.clone(), v_cache.clone(), heads, dim ** -0.5, use_decode_kernel=use_kernel)
        if use_kernel and attn.prefill_kernel is None:
            pytest.skip("C++ extension not built (ettrl_kernels._C has no paged_prefill_attention)")
        attn.plan(query_lens, lens, tables, slots)
        outs[use_kernel] = attn(0, q, k, v)
    torch.testing.assert_close(outs[True].double(), outs[False].double(), **TOLERANCE[dtype])
    attn = TorchPagedAttention(k_cache.clone(), v_cache.clone(), heads, dim ** -0.5)
    attn.plan([1, 1], lens[:2], tables[:2], slots[:2])
    assert torch.equal(attn(0, q[:2], k[:2], v[:2]), outs[True][:2])
