"""LLM API behaviour: stop conditions, lengths, errors, update_weights."""
import pytest
import torch

from engine import LLM, SamplingParams
from tiny_models import hf_token_stats, make_tiny_model

PROMPT = list(range(65, 91))  # "ABC...Z" in the byte tokenizer
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_tok")
    make_tiny_model("llama_tied", path, tokenizer=True)
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype="float32", block_size=4, num_kv_blocks=128)


def test_text_prompts_and_text_output(llm):
    out = llm.generate(["ABCDEFGHIJKLMNOPQRSTUVWXYZ"], GREEDY)[0]
    assert out.prompt_token_ids == PROMPT
    assert out.outputs[0].text == llm.decode(out.outputs[0].token_ids)


def test_stop_string_ends_generation_and_is_cut_from_text(llm):
    full = llm.generate([PROMPT], GREEDY)[0].outputs[0]
    ids = full.token_ids
    k = next(i for i in range(3, len(ids) - 1) if ids[i] < 128 and ids[i + 1] < 128)  # two ASCII characters
    stop = bytes(ids[k:k + 2]).decode()
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))
    sample = out[0].outputs[0]
    assert sample.finish_reason == "stop"
    first = llm.decode(ids).find(stop)
    assert sample.text == llm.decode(ids)[:first]
    assert sample.token_ids == ids[:len(sample.token_ids)] and len(sample.token_ids) <= k + 2


def test_eos_and_stop_token_ids(llm):
    ids = llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids
    token = ids[5]
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[token]))[0].outputs[0]
    assert out.token_ids == ids[:ids.index(token) + 1] and out.finish_reason == "stop"
    assert 256 in llm.engine.eos_token_ids  # the tokenizer's <eos>
    saved = llm.engine.eos_token_ids
    try:
        llm.engine.eos_token_ids = frozenset({token})
        out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
        assert out.token_ids == ids[:ids.index(token) + 1] and out.finish_reason == "stop"
        out = llm.generate([PROMPT], GREEDY)[0].outputs[0]
        assert out.token_ids == ids and out.finish_reason == "length"  # ignore_eos
    finally:
        llm.engine.eos_token_ids = saved


def test_max_tokens_and_max_model_len(model_dir):
    llm = LLM(model_dir, dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=40)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0].outputs[0]
    assert len(PROMPT) + len(out.token_ids) == 40 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="max length"):
        llm.generate([list(range(40))], GREEDY)


def test_request_that_can_never_fit_is_rejected_at_submission(model_dir):
    llm = LLM(model_dir, dtype="float32", block_size=4, num_kv_blocks=8)
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate([PROMPT], GREEDY)
    assert not llm.engine.has_unfinished()
    out = llm.generate([PROMPT[:8]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 20


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=0),
                                 dict(n=0), dict(max_tokens=0), dict(stop=[""]), dict(seed=-1)])
def test_bad_sampling_params(bad):
    with pytest.raises(ValueError, match="SamplingParams"):
        SamplingParams(**bad)


def test_bad_inputs_get_clear_errors(llm, tmp_path):
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 2, 999]], GREEDY)
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="dtype"):
        LLM(tmp_path, dtype="int8")
    with pytest.raises(KeyError, match="unknown parameter"):
        llm.update_weights({"model.layers.0.self_attn.qkv.weight": torch.zeros(1)})
    no_tokenizer = tmp_path / "bare"
    make_tiny_model("qwen3", no_tokenizer)
    bare = LLM(no_tokenizer, dtype="float32", num_kv_blocks=64)
    with pytest.raises(ValueError, match="tokenizer"):
        bare.generate(["hello"], GREEDY)
    with pytest.raises(ValueError, match="stop strings and stop_regex need a tokenizer"):
        bare.generate([[1, 2, 3]], SamplingParams(max_tokens=3, stop=["x"]))
    assert not bare.engine.has_unfinished() and not bare.engine.live_sequences()
    out = bare.generate([[1, 2, 3]], SamplingParams(max_tokens=3, seed=0))[0]
    assert out.outputs[0].text is None and len(out.outputs[0].token_ids) == 3


@pytest.mark.parametrize("kind", ["llama_tied", "qwen3"])
def test_update_weights_equals_a_fresh_engine(kind, tmp_path):
    make_tiny_model(kind, tmp_path / "old", seed=0)
    new_hf = make_tiny_model(kind, tmp_path / "new", seed=1)
    llm = LLM(tmp_path / "old", dtype="float32", block_size=4, num_kv_blocks=128)
    fresh = LLM(tmp_path / "new", dtype="float32", block_size=4, num_kv_blocks=128)
    params = SamplingParams(n=2, temperature=0.8, max_tokens=24, seed=4, ignore_eos=True)
    llm.generate([PROMPT], params)  # fills the prefix cache with KV of the old weights
    assert llm.engine.kv.tree.num_cached_blocks > 0
    state = new_hf.state_dict()
    if kind == "llama_tied":
        state.pop("lm_head.weight", None)
        written = llm.update_weights(list(state.items()))  # (name, tensor) pairs
    else:
        written = llm.update_weights(state)
    assert written == len(state)
    assert llm.engine.kv.tree.num_cached_blocks == 0
    got, want = llm.generate([PROMPT], params)[0], fresh.generate([PROMPT], params)[0]
    for a, b in zip(got.outputs, want.outputs):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    logprobs, _ = hf_token_stats(new_hf, PROMPT, got.outputs[0].token_ids, 0.8)
    torch.testing.assert_close(torch.tensor(got.outputs[0].logprobs), logprobs, atol=1e-4, rtol=0)


def test_update_weights_refused_while_sequences_are_live(llm):
    seqs = llm.engine.make_sequences(PROMPT, GREEDY)
    llm.engine.add_sequence(seqs[0])
    with pytest.raises(RuntimeError, match="live sequences"):
        llm.update_weights({})
    llm.engine.free(seqs[0])
    assert llm.update_weights({}) == 0


def test_generate_progress_bar(llm, capsys):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=4, ignore_eos=True)
    quiet = llm.generate([PROMPT, PROMPT[:5]], params)
    shown = llm.generate([PROMPT, PROMPT[:5]], params, use_tqdm=True)
    assert [[c.token_ids for c in o.outputs] for o in shown] == [[c.token_ids for c in o.outputs] for o in quiet]
    assert "generate" in capsys.readouterr().out
