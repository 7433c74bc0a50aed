"""CPU-visible parts of the CUDA-path fixes (issue 20): bf16 temperature, imports without the extension,
device defaults, flashinfer fallbacks, Triton device guards."""
import contextlib
import importlib.abc
import os
import sys
import types
from pathlib import Path

import pytest
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


# ---- import engine without the C++ extension (5) ----------------------------------------------------------------
NO_EXTENSION = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ("engine._C", "ettrl_kernels._C"):
            raise ImportError("not built: " + name)
sys.meta_path.insert(0, Block())
import engine
from engine.extension import core, extension
assert core() is None and extension() is None
from engine.radix_cache import RadixCache
try:
    RadixCache(4, 16)
except ImportError as e:
    assert "build_ext" in str(e), e
else:
    raise AssertionError("RadixCache without engine._C")
print("ok")
"""


def test_import_engine_without_the_extension():
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", NO_EXTENSION], check=False, capture_output=True, text=True,
                            timeout=120, cwd=root, env={**os.environ, "PYTHONPATH": f"{root}:{root / 'kernels'}"})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# ---- flashinfer: availability, fallbacks, plan arguments (1, 2, 7, 12) -------------------------------------------
def test_flashinfer_usable_says_why_not():
    from engine.attention import flashinfer as fi
    assert fi.flashinfer_usable("cpu", torch.bfloat16) == (False, "flashinfer runs on CUDA devices only, not cpu")
    usable, why = fi.flashinfer_usable("cuda", torch.float32)
    assert not usable and "float32" in why
    from unittest import mock
    with mock.patch.object(fi, "installed_version", return_value=None):
        usable, why = fi.flashinfer_usable("cuda", torch.bfloat16)
        assert not usable and "not installed" in why and fi.PINNED_VERSION in why
    with mock.patch.object(fi, "installed_version", return_value="0.1.6"):
        usable, why = fi.flashinfer_usable("cuda", torch.bfloat16)
        assert not usable and "older" in why
    with mock.patch.object(fi, "installed_version", return_value=fi.PINNED_VERSION), \
            mock.patch.dict("sys.modules", {"flashinfer": types.ModuleType("flashinfer")}):
        assert fi.flashinfer_usable("cuda", torch.float16) == (True, "")
    assert fi._version_tuple("0.6.18.post1") == (0, 6, 18) and fi._version_tuple("0.2.0rc1") == (0, 2, 0)


def test_cuda_falls_back_to_torch_attention_with_a_warning(monkeypatch):
    from engine.attention import flashinfer as fi
    from engine.attention.registry import select_backend
    from engine.attention.torch_paged import TorchPagedAttention
    cuda = torch.device("cuda")
    monkeypatch.setattr(fi, "installed_version", lambda: fi.PINNED_VERSION)
    with pytest.warns(UserWarning, match="float32"):  # fp32 on CUDA: flashinfer has no fp32 kernels
        assert select_backend("auto", cuda, torch.float32) is TorchPagedAttention
    with pytest.raises(ValueError, match="float32"):
        select_backend("flashinfer", cuda, torch.float32)
    monkeypatch.setattr(fi, "installed_version", lambda: None)
    with pytest.warns(UserWarning, match="not installed"):
        assert select_backend("auto", cuda, torch.bfloat16) is TorchPagedAttention
    monkeypatch.setattr(fi, "installed_version", lambda: "0.1.6")
    with pytest.warns(UserWarning, match="older"):
        assert select_backend("auto", cuda, torch.bfloat16) is TorchPagedAttention
    monkeypatch.setattr(fi, "installed_version", lambda: fi.PINNED_VERSION)
    monkeypatch.setitem(sys.modules, "flashinfer", types.ModuleType("flashinfer"))  # importable
    assert select_backend("auto", cuda, torch.bfloat16) is fi.FlashInferPagedAttention


class MissingTvmFfi(importlib.abc.MetaPathFinder):
    """What a `--no-deps` install of flashinfer 0.6.18 meets: its import of tvm_ffi fails."""

    def find_spec(self, name, path, target=None):
        if name == "flashinfer":
            raise ModuleNotFoundError("No module named 'tvm_ffi'")


def test_flashinfer_that_does_not_import_is_not_usable(monkeypatch):
    """Installed (metadata present) but its import fails: auto falls back to the torch attention with the reason,
    a named flashinfer says what to install."""
    from engine.attention import flashinfer as fi
    from engine.attention.registry import select_backend
    from engine.attention.torch_paged import TorchPagedAttention
    monkeypatch.setattr(fi, "installed_version", lambda: fi.PINNED_VERSION)
    monkeypatch.delitem(sys.modules, "flashinfer", raising=False)
    monkeypatch.setattr(sys, "meta_path", [MissingTvmFfi(), *sys.meta_path])
    usable, why = fi.flashinfer_usable("cuda", torch.bfloat16)
    assert not usable and "does not import (ModuleNotFoundError: No module named 'tvm_ffi')" in why
    assert f"apache-tvm-ffi=={fi.TVM_FFI_VERSION}" in why and "--no-index --no-deps --target" in why
    with pytest.warns(UserWarning, match="tvm_ffi"):
        assert select_backend("auto", torch.device("cuda"), torch.bfloat16) is TorchPagedAttention
    with pytest.raises(ValueError, match="attention_backend='flashinfer' cannot serve.*apache-tvm-ffi"):
        select_backend("flashinfer", torch.device("cuda"), torch.bfloat16)


class FakeWrapper:
    def __init__(self, workspace, layout, **kwargs):
        self.workspace, self.layout, self.kwargs, self.plans = workspace, layout, kwargs, []

    def plan(self, *args, **kwargs):
        self.plans.append((args, kwargs))


def use_fake_flashinfer(monkeypatch, wrapper):
    """Installs a stand-in flashinfer module whose prefill and decode wrappers are `wrapper`; returns our backend
    module, told that flashinfer is usable and given a small workspace."""
    import sys

    from engine.attention import flashinfer as fi
    fake = types.SimpleNamespace(BatchPrefillWithPagedKVCacheWrapper=wrapper,
                                 BatchDecodeWithPagedKVCacheWrapper=wrapper)
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    monkeypatch.setattr(fi, "flashinfer_usable", lambda device, dtype: (True, ""))
    monkeypatch.setattr(fi, "WORKSPACE_BYTES", 1 << 12)
    return fi


def test_flashinfer_backend_workspace_and_plan_arguments(monkeypatch):
    """With a stand-in flashinfer module: zeroed workspace, FA2 for prefill and tensor-core decode (one JIT module;
    prefill's "auto" would pick FA3 on sm_90), both with the same fixed split size (batch invariance), host-side
    indptr / last-page lengths, device-side page list."""
    fi = use_fake_flashinfer(monkeypatch, FakeWrapper)
    k = torch.zeros(2, 10, 4, 2, 8, dtype=torch.bfloat16)
    attn = fi.FlashInferPagedAttention(k, k.clone(), 4, 0.125)
    assert attn.decode.workspace is attn.prefill.workspace and not attn.decode.workspace.any()
    assert attn.decode.kwargs == {"use_tensor_cores": True, "backend": "fa2"}
    assert attn.prefill.kwargs == {"backend": "fa2"}
    tables = torch.tensor([[3, 1, 0], [7, 8, 9]])
    attn.plan([1, 1], [5, 12], tables, torch.tensor([4 * 1, 4 * 9 + 3]))
    (indptr, indices, last, *rest), kwargs = attn.decode.plans[-1]
    assert indptr.tolist() == [0, 2, 5] and indptr.device.type == "cpu"
    assert indices.tolist() == [3, 1, 7, 8, 9] and indices.dtype == torch.int32
    assert last.tolist() == [1, 4] and rest == [4, 2, 8, 4]
    assert kwargs["fixed_split_size"] == fi.SPLIT_TOKENS // 4 and kwargs["sm_scale"] == 0.125
    attn.plan([3, 2], [5, 12], tables, torch.arange(5))
    (qo_indptr, indptr, indices, last, *rest), kwargs = attn.prefill.plans[-1]
    assert qo_indptr.tolist() == [0, 3, 5] and kwargs["causal"] and not attn.is_decode
    assert indptr.tolist() == [0, 2, 5] and indices.tolist() == [3, 1, 7, 8, 9] and last.tolist() == [1, 4]
    assert kwargs["fixed_split_size"] == fi.SPLIT_TOKENS // 4 and rest == [4, 2, 8, 4]
    with pytest.raises(RuntimeError, match="float32"):
        monkeypatch.setattr(fi, "flashinfer_usable", lambda device, dtype: (False, "no float32 kernels"))
        fi.FlashInferPagedAttention(k.float(), k.float(), 4, 0.125)


# ---- Triton launches on the tensor's device (4) ------------------------------------------------------------------
def test_device_guard_selects_the_tensor_device(monkeypatch):
    from ettrl_kernels.backend import device_guard
    with device_guard(torch.zeros(1)):  # CPU (interpreter): nothing to select
        pass
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())
    fake = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    with device_guard(fake):
        pass
    assert entered == [torch.device("cuda", 1)]


# ---- copy-on-write: one batched copy per step (11) ---------------------------------------------------------------
class CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def sequential_copies(pool, copies):
    pool = pool.clone()
    for src, dst in copies:
        pool[:, dst] = pool[:, src]
    return pool


@pytest.mark.parametrize("copies", [
    [(0, 5), (1, 6), (2, 7)],
    [(3, 4), (5, 3)],          # a source freed after its copy is reused as a later target: batchable
    [(0, 5), (5, 6)],          # a target read by a later copy: one by one
    [(0, 5), (1, 5)],          # a target written twice: one by one (the last wins)
])
def test_copy_blocks_equals_copies_in_order(copies):
    from engine.kv_cache import KVCache, _batchable
    kv = KVCache.__new__(KVCache)
    kv.k, kv.v = torch.randn(2, 8, 4, 2, 3), torch.randn(2, 8, 4, 2, 3)
    want_k, want_v = sequential_copies(kv.k, copies), sequential_copies(kv.v, copies)
    with CountOps() as counter:
        kv.copy_blocks(copies)
    assert torch.equal(kv.k, want_k) and torch.equal(kv.v, want_v)
    if _batchable(copies):
        assert counter.ops.count("index_copy_") == 2 and counter.ops.count("index_select") == 2


def test_forks_copy_their_shared_blocks_in_one_batch(tmp_path):
    """Eight forks inside one partially filled block: their first step copies eight blocks with one index_copy_
    per pool, and every fork samples what a fresh sequence with the same key samples."""
    from engine import LLM, SamplingParams, Sequence
    from engine.kv_cache import KVCache
    from tiny_models import make_tiny_model
    make_tiny_model("qwen2", tmp_path)
    llm = LLM(tmp_path, dtype="float32", device="cpu", block_size=4, num_kv_blocks=128)
    params = SamplingParams(temperature=0.9, max_tokens=6, ignore_eos=True)
    root = Sequence(list(range(20, 30)), params, 7, seq_id=0)
    engine = llm.engine
    engine.add_sequence(root)
    while not root.is_finished:
        engine.step()
    position = len(root) - 2  # inside a shared, partially filled block
    children = [engine.fork(root, position, params, 7, seq_id=j) for j in range(1, 9)]
    calls = []
    original = KVCache.copy_blocks

    def counted(self, copies):
        with CountOps() as counter:
            original(self, copies)
        calls.append((len(copies), counter.ops.count("index_copy_")))

    KVCache.copy_blocks = counted
    try:
        while any(not c.is_finished for c in children):
            engine.step()
    finally:
        KVCache.copy_blocks = original
    assert (8, 2) in calls
    for child in children:
        fresh = Sequence(child.token_ids[:position], params, 7, seq_id=child.seq_id, num_prompt_tokens=10)
        engine.add_sequence(fresh)
        while not fresh.is_finished:
            engine.step()
        assert fresh.token_ids == child.token_ids
        engine.free(fresh)
    for seq in [root, *children]:
        engine.free(seq)
    llm.check_integrity()


# ---- host syncs (9) ------------------------------------------------------------------------------------------
def test_row_params_reads_the_device_once():
    """No scalar reads (each one a GPU sync) while the per-row parameters are built: one tolist at the end."""
    from ettrl_kernels.sampling_common import row_params
    logits = torch.randn(4, 50)
    with CountOps() as counter:
        params = row_params(logits, torch.tensor([0.0, 0.5, 1.0, 0.7]), 5, 0.9, 1, None, 3,
                            torch.tensor([-1, 2, -1, -1]))
    assert not {"_local_scalar_dense", "is_nonzero", "item"} & set(counter.ops)
    assert params.truncated and params.any_exclude
    with pytest.raises(ValueError, match="top_p"):
        row_params(logits, 1.0, 0, 0.0, 1, None, 3, None)


def test_step_tensors_come_from_one_host_buffer():
    from engine.step_tensors import to_device
    a, b, c = to_device(torch.device("cpu"), torch.int64, [1, 2], [], [3, 4, 5])
    assert a.tolist() == [1, 2] and b.tolist() == [] and c.tolist() == [3, 4, 5]
    assert a.untyped_storage().data_ptr() == c.untyped_storage().data_ptr()


# ---- Triton sampler: the vocabulary split over programs (8) ------------------------------------------------------
def test_triton_vocab_split_merges_slices_exactly():
    """Rows spanning several slices: logsumexp and entropy as float64 computes them, ties between slices go to
    the lowest token (as one program would), and the split depends on V only."""
    from ettrl_kernels import sampling_triton
    vocab = 3 * sampling_triton.SPLIT + 77
    torch.manual_seed(4)
    logits = torch.randn(3, vocab) * 3
    logits[0, 5] = logits[0, vocab - 3] = 40.0        # greedy tie across the first and the last slice
    logits[1, : sampling_triton.SPLIT] = float("-inf")  # a slice with nothing in it
    temperature = torch.tensor([0.0, 0.7, 1.3])
    tokens, logprobs, entropies = ettrl_kernels.entropy_sample(logits, temperature=temperature, backend="triton")
    ref = ettrl_kernels.entropy_sample(logits, temperature=temperature, backend="torch")
    assert tokens[0] == 5 and torch.equal(tokens, ref[0])
    temp = torch.where(temperature == 0, 1.0, temperature).double()[:, None]
    logp = torch.log_softmax(logits.double() / temp, -1)
    exact_entropy = -(logp.exp() * torch.where(logp.isinf(), 0.0, logp)).sum(-1)
    torch.testing.assert_close(entropies.double(), exact_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logprobs.double(), logp.gather(1, tokens[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)
    assert sampling_triton.split_size(vocab, 1024) == sampling_triton.SPLIT
    assert sampling_triton.split_size(1000, 1024) == 1024


def test_flashinfer_plan_failure_says_what_to_do(monkeypatch):
    class Failing(FakeWrapper):
        def plan(self, *args, **kwargs):
            raise OSError("nvcc: not found")

    fi = use_fake_flashinfer(monkeypatch, Failing)
    k = torch.zeros(1, 4, 4, 2, 8, dtype=torch.bfloat16)
    attn = fi.FlashInferPagedAttention(k, k.clone(), 4, 0.125)
    with pytest.raises(RuntimeError, match="nvcc: not found.*attention_backend='torch'"):
        attn.plan([1], [3], torch.tensor([[2]]), torch.tensor([10]))


def test_flashinfer_page_list_needs_no_device_read(monkeypatch):
    """The page list comes from the block tables through an index built on the host from the lengths: no boolean
    mask (its gather waits for the device to count the mask) and no scalar read while planning."""
    fi = use_fake_flashinfer(monkeypatch, FakeWrapper)
    k = torch.zeros(1, 12, 4, 2, 8, dtype=torch.bfloat16)
    attn = fi.FlashInferPagedAttention(k, k.clone(), 4, 0.125)
    tables = torch.tensor([[3, 1, 0, 0], [7, 8, 9, 11], [2, 0, 0, 0]])
    seen = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            seen.append((func.overloadpacket.__name__, [t.dtype for t in tensors]))
            return func(*args, **(kwargs or {}))

    with Record():
        attn.plan([1, 1, 1], [5, 16, 2], tables, torch.tensor([4, 63, 9]))
    (_, indices, *_), _ = attn.decode.plans[-1]
    assert indices.tolist() == [3, 1, 7, 8, 9, 11, 2]
    ops = {name for name, _ in seen}
    assert not ops & {"index", "nonzero", "masked_select", "_local_scalar_dense", "item", "is_nonzero"}, ops
    assert not any(torch.bool in dtypes for _, dtypes in seen), seen
    assert "index_select" in ops


def test_flashinfer_backend_plans_a_tiny_batch_when_built(monkeypatch):
    """create() plans one decode and one prefill batch, so a flashinfer whose kernels cannot build (no nvcc,
    ninja or CUDA headers) fails when the engine is built: auto falls back to the torch attention with the
    reason, a named flashinfer raises it."""
    from engine.attention.base import BackendUnavailable
    from engine.attention.registry import create_backend
    from engine.attention.torch_paged import TorchPagedAttention
    from engine.config import EngineConfig
    fi = use_fake_flashinfer(monkeypatch, FakeWrapper)
    k = torch.zeros(1, 6, 4, 2, 8, dtype=torch.bfloat16)
    config = EngineConfig(model="m", device="cpu")
    attn = fi.FlashInferPagedAttention.create(k, k.clone(), 4, 0.125, config)
    (indptr, indices, last, *_), _ = attn.decode.plans[0]
    assert (indptr.tolist(), indices.tolist(), last.tolist()) == ([0, 1], [0], [1]) and len(attn.decode.plans) == 1
    (qo_indptr, *_), _ = attn.prefill.plans[0]
    assert qo_indptr.tolist() == [0, 2] and len(attn.prefill.plans) == 1
    cuda = torch.device("cuda")
    assert isinstance(create_backend("auto", k, k.clone(), 4, 0.125, config, cuda), fi.FlashInferPagedAttention)

    class NoCompiler(FakeWrapper):
        def plan(self, *args, **kwargs):
            raise RuntimeError("Could not find nvcc and default cuda_home='/usr/local/cuda' doesn't exist")

    fi = use_fake_flashinfer(monkeypatch, NoCompiler)
    with pytest.raises(BackendUnavailable, match="failed to plan a decode step.*Could not find nvcc.*CUDA_HOME"):
        fi.FlashInferPagedAttention.create(k, k.clone(), 4, 0.125, config)
    with pytest.warns(UserWarning, match="using the torch paged attention on cuda: .*Could not find nvcc"):
        attn = create_backend("auto", k, k.clone(), 4, 0.125, config, cuda)
    assert type(attn) is TorchPagedAttention
    with pytest.raises(ValueError, match="attention_backend='flashinfer' cannot start on cuda: .*Could not find nvcc"):
        create_backend("flashinfer", k, k.clone(), 4, 0.125, config, cuda)
