"""The model registry (engine/models/registry.py) and the attention-backend registry (engine/attention/registry.py):
lookups, clear errors for what is not there, and that the choice reaches the engine."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.attention import registry as attention
from engine.attention.base import AttentionBackend
from engine.attention.torch_paged import CpuPagedAttention, TorchPagedAttention
from engine.extension import extension
from engine.layers import decode_layers
from engine.models import registry
from engine.models.llama import CausalLM
from tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 100, 200]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
needs_panels = pytest.mark.skipif(extension() is None or not extension().panel_linear_available(),
                                  reason="CPU lacks AVX512-BF16 (or C++ extension not built): no panel_linear")


def tokens(llm: LLM) -> list[list[int]]:
    return [c.token_ids for out in llm.generate(PROMPTS, GREEDY) for c in out.outputs]


def set_architecture(model_dir: Path, name: str) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "architectures": [name]}))


@pytest.mark.parametrize("name, kind", [("LlamaForCausalLM", "llama"), ("MistralForCausalLM", "llama"),
                                        ("Qwen2ForCausalLM", "qwen2"), ("Qwen3ForCausalLM", "qwen3")])
def test_architectures_map_to_the_llama_variants(name, kind):
    config = {"architectures": [name], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
              "num_hidden_layers": 1, "num_attention_heads": 2}
    spec = registry.model_spec(config)
    assert spec.model_class is CausalLM
    args = spec.parse_args(config)
    assert args.model_type == kind
    assert (args.qkv_bias, args.qk_norm) == (kind == "qwen2", kind == "qwen3")


def test_model_type_serves_a_config_without_architectures():
    assert registry.model_spec({"model_type": "qwen3"}) is registry.MODELS["Qwen3ForCausalLM"]


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        registry.model_spec({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        registry.model_spec({"model_type": "gpt2"})


def test_a_new_llama_like_architecture_is_one_registry_line(tmp_path, monkeypatch):
    make_tiny_model("llama", tmp_path / "llama")
    make_tiny_model("llama", tmp_path / "new")
    set_architecture(tmp_path / "new", "MyLlamaForCausalLM")
    with pytest.raises(ValueError, match="MyLlamaForCausalLM"):
        LLM(tmp_path / "new", dtype="float32")
    monkeypatch.setitem(registry.MODELS, "MyLlamaForCausalLM", registry.MODELS["LlamaForCausalLM"])
    assert tokens(LLM(tmp_path / "new", dtype="float32")) == tokens(LLM(tmp_path / "llama", dtype="float32"))


class UnknownLayers(CausalLM):
    """A subclass: its layers may compute something else, so it does not inherit the C++ decode stack."""


@needs_panels
def test_fused_decode_declines_a_class_that_does_not_declare_its_layout(tmp_path, monkeypatch):
    make_tiny_model("qwen2", tmp_path)
    reference = tokens(LLM(tmp_path, dtype="bfloat16"))
    set_architecture(tmp_path, "UnknownLayersForCausalLM")
    monkeypatch.setitem(registry.MODELS, "UnknownLayersForCausalLM",
                        registry.ModelSpec(UnknownLayers, registry.MODELS["Qwen2ForCausalLM"].parse_args))
    llm = LLM(tmp_path, dtype="bfloat16")
    assert isinstance(llm.engine.runner.model, UnknownLayers)
    why = decode_layers.build(llm.engine.runner.model)
    assert why == "UnknownLayers does not declare fused_decode_layout = 'llama'"
    calls = []
    op = decode_layers._OP
    monkeypatch.setattr(decode_layers, "_OP", lambda *args: calls.append(1) or op(*args))
    assert tokens(llm) == reference  # the Python layer loop: the same bits as the C++ stack
    assert not calls


@needs_panels
def test_fused_decode_is_an_engine_config_field(tmp_path, monkeypatch):
    make_tiny_model("llama", tmp_path)
    calls = []
    op = decode_layers._OP
    monkeypatch.setattr(decode_layers, "_OP", lambda *args: calls.append(1) or op(*args))
    on = tokens(LLM(tmp_path, dtype="bfloat16"))
    assert calls
    calls.clear()
    off = LLM(tmp_path, dtype="bfloat16", fused_decode=False)
    assert off.engine.runner.model.fused_decode is False
    assert tokens(off) == on and not calls


def test_auto_picks_cpu_paged_on_the_cpu_and_torch_is_the_reference():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert attention.select_backend("auto", torch.device("cpu"), dtype) is CpuPagedAttention
    assert attention.select_backend("torch", "cpu", torch.float32) is TorchPagedAttention
    k = v = torch.zeros(1, 4, 4, 2, 8)
    config = EngineConfig(model="unused")
    reference = TorchPagedAttention.create(k, v, 4, 0.5, config)
    assert reference.kernel is None and not reference.takes_qkv
    cpu = CpuPagedAttention.create(k, v, 4, 0.5, config)
    assert cpu.kernel is not None or extension() is None
    assert cpu.takes_qkv == (extension() is not None)
    assert not CpuPagedAttention.create(k, v, 4, 0.5, EngineConfig(model="unused", fused_ops=False)).takes_qkv


def test_every_registered_backend_implements_the_interface():
    for name in attention.BACKENDS:
        try:
            cls = attention.backend_class(name)
        except ImportError:  # a backend module that needs its library at import
            continue
        assert issubclass(cls, AttentionBackend) and cls.name == name


def test_unusable_or_unknown_backends_are_clear_errors():
    with pytest.raises(ValueError, match="attention_backend='flashinfer' cannot serve"):
        attention.select_backend("flashinfer", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="cpu_paged.*CPU only"):
        attention.select_backend("cpu_paged", torch.device("meta"), torch.bfloat16)
    with pytest.raises(ValueError, match="attention_backend must be one of.*'cpu_paged'"):
        EngineConfig(model="unused", attention_backend="sdpa")


def test_torch_backend_gives_the_cpu_kernels_tokens(tmp_path):
    make_tiny_model("qwen3", tmp_path)
    reference = LLM(tmp_path, dtype="float32", attention_backend="torch")
    assert type(reference.engine.runner.attn) is TorchPagedAttention
    llm = LLM(tmp_path, dtype="float32")
    assert type(llm.engine.runner.attn) is CpuPagedAttention
    assert tokens(reference) == tokens(llm)


def test_a_cpu_engine_never_imports_flashinfer(tmp_path):
    make_tiny_model("llama", tmp_path)
    code = (f"import sys; from engine import LLM, SamplingParams; llm = LLM({str(tmp_path)!r}, dtype='float32'); "
            "llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2)); "
            "assert not [m for m in sys.modules if 'flashinfer' in m], [m for m in sys.modules if 'flashinfer' in m]")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
