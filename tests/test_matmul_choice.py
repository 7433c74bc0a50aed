"""The CPU matmul kernel choice (engine/layers/matmul_choice.py): measured once, stored, read back, overridable, and
every kernel (and the AVX2 dispatch) gives transformers' greedy tokens."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.layers import matmul_choice
from engine.layers.matmul_choice import (
    BATCH_BUCKETS,
    available_kernels,
    choice_file,
    resolve_kernel,
)
from engine.layers.packed_linear import Panels
from tiny_models import hf_greedy, make_tiny_model

SHAPES = [(96, 64), (64, 64), (300, 64)]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 100, 200], list(range(20, 57))]
HAS_PANEL = "panel" in available_kernels(torch.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return path, make_tiny_model("llama", path)


def _fake_timings(fastest: str) -> dict:
    return {k: {str(b): (1.0 if k == fastest else 2.0) for b in BATCH_BUCKETS} for k in matmul_choice.KERNELS}


def test_choice_is_measured_once_then_read_from_the_file(tmp_path, monkeypatch):
    kernel = resolve_kernel(SHAPES, torch.float32, "auto", batch_invariant=False, cache_dir=tmp_path)
    data = json.loads(choice_file(tmp_path).read_text())
    assert data["machine"] == matmul_choice.machine_key()
    for out, inp in SHAPES:
        assert set(data["timings"][f"float32 {out}x{inp}"]) == set(available_kernels(torch.float32))
    monkeypatch.setattr(matmul_choice, "measure", lambda *a: pytest.fail("measured again"))
    assert resolve_kernel(SHAPES, torch.float32, "auto", batch_invariant=False, cache_dir=tmp_path) == kernel


@pytest.mark.parametrize("fastest", ["onednn", "torch", "panel"])
def test_choice_is_the_fastest_stored_kernel(tmp_path, fastest):
    if fastest not in available_kernels(torch.float32):
        pytest.skip(f"kernel not available on this CPU: {fastest}")
    path = choice_file(tmp_path)
    path.parent.mkdir(parents=True)
    timings = {f"float32 {o}x{i}": _fake_timings(fastest) for o, i in SHAPES}
    path.write_text(json.dumps({"machine": matmul_choice.machine_key(), "timings": timings}))
    assert resolve_kernel(SHAPES, torch.float32, "auto", batch_invariant=False, cache_dir=tmp_path) == fastest
    # batch_invariant: only panel_linear is eligible where it exists, whatever the timings
    invariant = resolve_kernel(SHAPES, torch.float32, "auto", batch_invariant=True, cache_dir=tmp_path)
    assert invariant == ("panel" if HAS_PANEL else fastest)


@pytest.mark.parametrize("content", ["{not json", '{"machine": 3}', "[]", ""])
def test_corrupt_file_is_measured_again(tmp_path, content):
    path = choice_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    kernel = resolve_kernel(SHAPES, torch.float32, "auto", batch_invariant=False, cache_dir=tmp_path)
    assert kernel in available_kernels(torch.float32)
    assert len(json.loads(path.read_text())["timings"]) == len(SHAPES)


def test_override_wins_and_writes_nothing(tmp_path):
    for kernel in available_kernels(torch.float32):
        assert resolve_kernel(SHAPES, torch.float32, kernel, cache_dir=tmp_path) == kernel
    assert not choice_file(tmp_path).exists()
    with pytest.raises(ValueError, match="matmul_kernel"):
        resolve_kernel(SHAPES, torch.float32, "amx", cache_dir=tmp_path)
    if not HAS_PANEL:
        with pytest.raises(ValueError, match="not available"):
            resolve_kernel(SHAPES, torch.float32, "panel", cache_dir=tmp_path)


@pytest.mark.parametrize("kernel", available_kernels(torch.float32))
def test_every_kernel_gives_transformers_greedy_tokens(tiny, kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("ETTRL_CACHE", str(tmp_path))
    path, hf = tiny
    llm = LLM(path, dtype="float32", block_size=4, num_kv_blocks=256, matmul_kernel=kernel)
    assert llm.engine.runner.matmul_kernel == kernel
    packed = llm.engine.runner.model.layers[0].mlp.down_packed
    assert isinstance(packed, Panels) == (kernel == "panel") and (packed is None) == (kernel == "torch")
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(hf, PROMPTS, 24)


@pytest.mark.skipif(not HAS_PANEL, reason="CPU lacks AVX512-BF16 (panel_linear)")
def test_auto_keeps_panel_linear_and_its_tokens(tiny, tmp_path, monkeypatch):
    """On an AVX-512 BF16 CPU the default (auto, batch-invariant) is panel_linear, as before the choice existed."""
    monkeypatch.setenv("ETTRL_CACHE", str(tmp_path))
    params = SamplingParams(n=3, temperature=0.8, max_tokens=24, ignore_eos=True, seed=7)
    tokens = {}
    for kernel in ("auto", "panel"):
        llm = LLM(tiny[0], dtype="bfloat16", block_size=4, num_kv_blocks=256, matmul_kernel=kernel)
        assert llm.engine.runner.matmul_kernel == "panel"
        tokens[kernel] = [[s.token_ids for s in o.outputs] for o in llm.generate(PROMPTS, params)]
    assert tokens["auto"] == tokens["panel"]


AVX2_SCRIPT = textwrap.dedent("""
    import sys, warnings
    import torch
    sys.path.insert(0, sys.argv[2])
    from engine import LLM, SamplingParams
    from engine.extension import extension
    from tiny_models import hf_greedy, make_tiny_model
    assert not extension().panel_linear_available()
    hf = make_tiny_model("qwen2", sys.argv[1])
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 100, 200]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = LLM(sys.argv[1], dtype="float32", block_size=4, num_kv_blocks=256)
    assert llm.engine.runner.matmul_kernel != "panel", llm.engine.runner.matmul_kernel
    assert any("batch-invariant" in str(w.message) for w in caught), [str(w.message) for w in caught]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(hf, prompts, 24)
    bf16 = LLM(sys.argv[1], dtype="bfloat16", block_size=4, num_kv_blocks=256)
    out = bf16.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 8 for o in out)
    print("ok", llm.engine.runner.matmul_kernel)
""")


def test_avx2_dispatch_generates_transformers_tokens(tmp_path):
    """The CPU without AVX-512 (as far as the run-time dispatch goes): no panels, no AVX-512 attention; the engine
    picks a measured oneDNN/torch path, warns that it is not batch-invariant, and still matches transformers."""
    tests = Path(__file__).parent
    env = {**os.environ, "ETTRL_NO_AVX512": "1", "ETTRL_NO_AVX512_BF16": "1", "ETTRL_NO_PANEL_LINEAR": "1",
           "ETTRL_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", AVX2_SCRIPT, str(tmp_path / "model"), str(tests)], env=env, check=False,
                         capture_output=True, text=True, timeout=600, cwd=tests.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[-1].startswith("ok "), run.stdout
    assert any(choice_file(tmp_path / "cache").parent.glob("*.json"))
