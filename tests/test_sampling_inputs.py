"""What `entropy_sample` does with its inputs before any backend runs: bad logits are refused with a message
that says what to pass, strided logits sample like contiguous ones on every backend, the defaults are the
documented ones, and the global default dtype does not leak into the outputs."""
import pytest
import torch

import ettrl_kernels
from ettrl_kernels import sampling_torch
from ettrl_kernels.sampling_cpu import cpp_kernel

CPU_BACKENDS = ["auto", "torch", "cpp"]  # auto: the C++ op for float32 without top-k/top-p, where it is built
TRUNCATING = ["auto", "torch", "triton"]  # the backends that do top-k / top-p


def skip_cpp_unbuilt(backend: str) -> None:
    if backend == "cpp" and cpp_kernel() is None:
        pytest.skip("C++ extension not built")


def logits_for(batch=3, vocab=50):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(1)) * 3


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 4), torch.zeros(5), torch.zeros(2, 5, dtype=torch.int64),
                                 torch.zeros(2, 5, dtype=torch.float64)])
def test_bad_logits_are_refused_with_what_to_pass(bad):
    message = f"logits must be a [B, V] float32/bfloat16 tensor, got {bad.dtype} {tuple(bad.shape)}"
    with pytest.raises(ValueError) as err:
        ettrl_kernels.entropy_sample(bad)
    assert str(err.value) == message


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "triton"])  # the Triton kernel reads rows as contiguous
@pytest.mark.parametrize("step", [2, 3])
def test_strided_logits_sample_like_contiguous_ones(backend, step):
    skip_cpp_unbuilt(backend)
    wide = logits_for(vocab=50 * step)
    strided = wide[:, ::step]  # stride(1) == step
    dense = strided.contiguous()
    kwargs = dict(temperature=0.8, seeds=torch.tensor([3, 4, 5]), positions=7, backend=backend)
    got, want = ettrl_kernels.entropy_sample(strided, **kwargs), ettrl_kernels.entropy_sample(dense, **kwargs)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_defaults_are_seed_0_and_no_truncation(backend):
    skip_cpp_unbuilt(backend)
    logits = logits_for(batch=64)
    default = ettrl_kernels.entropy_sample(logits, backend=backend)
    explicit = ettrl_kernels.entropy_sample(logits, temperature=1.0, top_k=-1, top_p=1.0, seeds=0,
                                            seq_ids=torch.arange(64), positions=0, backend=backend)
    for got, want in zip(default, explicit):
        assert torch.equal(got, want)
    other_seed = ettrl_kernels.entropy_sample(logits, seeds=1, backend=backend)[0]
    assert not torch.equal(default[0], other_seed), "64 rows: some token must differ with another seed"


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "triton"])
def test_outputs_ignore_the_global_default_dtype(backend, monkeypatch):
    skip_cpp_unbuilt(backend)
    logits = logits_for(batch=8, vocab=1024)  # float64 sums would change the last bits of the statistics
    monkeypatch.setattr(sampling_torch, "_workspaces", {})  # the torch path's buffers are made afresh
    want = ettrl_kernels.entropy_sample(logits, temperature=0.7, seeds=2, backend=backend)
    monkeypatch.setattr(sampling_torch, "_workspaces", {})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = ettrl_kernels.entropy_sample(logits, temperature=0.7, seeds=2, backend=backend)
    finally:
        torch.set_default_dtype(previous)
    assert [t.dtype for t in got] == [torch.int64, torch.float32, torch.float32]
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "triton"])
def test_refusals_name_only_the_bad_rows(backend):
    skip_cpp_unbuilt(backend)
    logits = logits_for(batch=4)
    logits[2, 7] = float("nan")
    with pytest.raises(ValueError) as err:
        ettrl_kernels.entropy_sample(logits, backend=backend)
    assert str(err.value) == "entropy_sample: logits contain NaN or +inf in rows [2]"
    logits = logits_for(batch=4)
    logits[1] = float("-inf")
    logits[3] = float("-inf")
    logits[3, 5] = 0.0
    with pytest.raises(ValueError) as err:
        ettrl_kernels.entropy_sample(logits, exclude=torch.tensor([-1, -1, -1, 5]), backend=backend)
    assert str(err.value) == ("entropy_sample: no allowed token with nonzero probability in rows [1, 3] "
                              "(all logits -inf, or `exclude` removed the only one)")


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "triton"])
def test_a_refusal_lists_the_first_eight_bad_rows(backend):
    skip_cpp_unbuilt(backend)
    logits = logits_for(batch=12)
    logits[1:11] = float("-inf")
    with pytest.raises(ValueError, match=r"in rows \[1, 2, 3, 4, 5, 6, 7, 8\] \(all logits"):
        ettrl_kernels.entropy_sample(logits, backend=backend)
    logits[1:11] = float("nan")
    with pytest.raises(ValueError, match=r"in rows \[1, 2, 3, 4, 5, 6, 7, 8\]$"):
        ettrl_kernels.entropy_sample(logits, backend=backend)


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "triton"])
def test_parameters_as_scalars_zero_dim_or_per_row_tensors_of_any_dtype_sample_alike(backend):
    """Python numbers, 0-dim tensors and [B] tensors of other dtypes (float64, int32; a whole-number float top_k)
    are the same parameters."""
    skip_cpp_unbuilt(backend)
    logits = logits_for(batch=4, vocab=64)
    for truncation in [dict()] + ([] if backend == "cpp" else [dict(top_k=5, top_p=0.9)]):
        want = ettrl_kernels.entropy_sample(logits, temperature=0.7, seeds=3, positions=2, exclude=1,
                                            backend=backend, **truncation)
        wide, narrow = torch.float64, torch.int32
        zero_dim = {"top_k": torch.tensor(5, dtype=narrow), "top_p": torch.tensor(0.9, dtype=wide)}
        got = ettrl_kernels.entropy_sample(
            logits, temperature=torch.tensor(0.7, dtype=wide), seeds=torch.tensor(3, dtype=narrow),
            positions=torch.tensor(2, dtype=narrow), exclude=torch.tensor(1, dtype=narrow), backend=backend,
            **{k: zero_dim[k] for k in truncation})
        rows = {"top_k": torch.full((4,), 5.0, dtype=wide), "top_p": torch.full((4,), 0.9, dtype=wide)}
        per_row = ettrl_kernels.entropy_sample(
            logits, temperature=torch.full((4,), 0.7, dtype=wide), seeds=torch.full((4,), 3, dtype=narrow),
            positions=torch.full((4,), 2, dtype=narrow), exclude=torch.full((4,), 1, dtype=narrow),
            seq_ids=torch.arange(4, dtype=narrow), backend=backend, **{k: rows[k] for k in truncation})
        for other in (got, per_row):
            for g, w in zip(other, want):
                assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("name", ["temperature", "top_k", "top_p", "seeds", "seq_ids", "positions", "exclude"])
def test_a_parameter_of_the_wrong_shape_is_named(name):
    with pytest.raises(ValueError) as err:
        ettrl_kernels.entropy_sample(logits_for(batch=3), **{name: torch.ones(2, dtype=torch.int64)})
    assert str(err.value) == f"{name} must be a scalar or a tensor of shape [3], got (2,)"


@pytest.mark.parametrize("top_p", [0.0, -0.5])
def test_top_p_must_be_above_zero(top_p):
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\]; use top_p=1 to turn it off$"):
        ettrl_kernels.entropy_sample(logits_for(), top_p=top_p)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.5), "temperature must be >= 0 (0 means greedy)"),
    (dict(temperature=float("nan")), "temperature must be >= 0 (0 means greedy)"),
    (dict(exclude=-2), "exclude must be -1 (nothing) or a token id in [0, 50)"),
    (dict(exclude=50), "exclude must be -1 (nothing) or a token id in [0, 50)"),
])
def test_bad_parameters_are_refused_with_what_to_pass(kwargs, message):
    with pytest.raises(ValueError) as err:
        ettrl_kernels.entropy_sample(logits_for(), **kwargs)
    assert str(err.value) == message


@pytest.mark.parametrize("backend", TRUNCATING)
def test_top_k_1_alone_samples_the_best_token(backend):
    skip_cpp_unbuilt(backend)
    logits = logits_for(batch=64)
    tokens = ettrl_kernels.entropy_sample(logits, top_k=1, backend=backend)[0]
    assert torch.equal(tokens, logits.argmax(1))
