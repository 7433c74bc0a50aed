"""engine.serve over real HTTP on 127.0.0.1 (uvicorn in a thread, a free port): the official openai client,
seeds under concurrent load, streaming, sample_tree, bad input, a bounded load test with cancelled streams.
Tokens are checked against LLM.generate / sample_tree of a second, in-process engine on the same weights."""
import asyncio
import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from engine import LLM, SamplingParams, TreeParams
from engine.serve.api_server import Server, ServerConfig
from serve_util import running
from tiny_models import make_tiny_model

KEY = "test-key"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
TREE = {"trees": 2, "forks": 1, "branches": 2}
ENGINE = {"dtype": "float32", "block_size": 4, "num_kv_blocks": 512, "max_model_len": 96}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_model")
    hf = make_tiny_model("llama", path, tokenizer=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path, hf


@pytest.fixture(scope="module")
def model_dir(made):
    return made[0]


@pytest.fixture(scope="module")
def hf_model(made):
    return made[1]


@pytest.fixture(scope="module")
def reference(model_dir):
    """The in-process engine the server's answers are compared with."""
    return LLM(model_dir, **ENGINE)


@pytest.fixture(scope="module")
def server(model_dir):
    return Server(LLM(model_dir, **ENGINE), ServerConfig("tiny", api_key=KEY))


@pytest.fixture(scope="module")
def url(server):
    with running(server.app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def headers(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def assert_idle_and_clean(server):
    """On the engine loop, once idle: no live sequence, integrity holds, every block free or cached."""
    def check():
        engine = server.engine
        engine.check_integrity()
        assert not engine.live_sequences() and not engine.has_unfinished()
        kv = engine.kv
        assert kv.allocator.num_free + kv.tree.num_cached_blocks == kv.num_blocks
    server.loop.barrier(check).result(timeout=60)


def extra(obj, name):
    return (obj.model_extra or {})[name]


def test_completions_with_n_logprobs_equal_in_process_generate(client, reference, server):
    out = client.completions.create(model="tiny", prompt="Hello there", n=3, max_tokens=8, seed=7,
                                    temperature=0.9, logprobs=2,
                                    extra_body={"return_token_ids": True, "return_entropies": True, "top_k": 50,
                                                "return_tokens_as_token_ids": True})
    ref = reference.generate(["Hello there"], SamplingParams(n=3, max_tokens=8, seed=7, temperature=0.9, top_k=50))[0]
    assert len(out.choices) == 3
    for choice, sample in zip(out.choices, ref.outputs):
        assert extra(choice, "token_ids") == sample.token_ids
        assert extra(choice, "prompt_token_ids") == ref.prompt_token_ids
        assert choice.text == sample.text and choice.finish_reason == sample.finish_reason
        assert choice.logprobs.token_logprobs == pytest.approx(sample.logprobs, abs=1e-5)
        assert extra(choice, "entropies") == pytest.approx(sample.entropies, abs=1e-5)
        assert choice.logprobs.tokens == [f"token_id:{t}" for t in sample.token_ids]
        for token, alts, lp in zip(choice.logprobs.tokens, choice.logprobs.top_logprobs,
                                   choice.logprobs.token_logprobs):
            assert alts[token] == pytest.approx(lp, abs=1e-5) and len(alts) <= 3
            assert all(v <= max(alts.values()) for v in alts.values())
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == sum(len(s.token_ids) for s in ref.outputs)


@pytest.mark.parametrize("mode", ["processed_logprobs", "raw_logprobs"])
def test_top_logprobs_equal_a_transformers_forward(client, server, hf_model, mode):
    """processed_logprobs: log_softmax(logits / T); raw_logprobs: log_softmax(logits); top 3 alternatives each."""
    server.config.logprobs_mode = mode
    try:
        out = client.completions.create(model="tiny", prompt=[65, 66, 67], max_tokens=5, temperature=0.7,
                                        logprobs=3, seed=1, extra_body={"return_token_ids": True,
                                                                        "return_tokens_as_token_ids": True})
    finally:
        server.config.logprobs_mode = "processed_logprobs"
    choice = out.choices[0]
    completion = extra(choice, "token_ids")
    with torch.no_grad():
        logits = hf_model(torch.tensor([[65, 66, 67] + completion])).logits[0, 2:-1].double()
    logp = torch.log_softmax(logits / (0.7 if mode == "processed_logprobs" else 1.0), -1)
    assert choice.logprobs.token_logprobs == pytest.approx(logp[range(len(completion)), completion].tolist(), abs=1e-4)
    for t, alts in enumerate(choice.logprobs.top_logprobs):
        top = logp[t].topk(3)
        for i, v in zip(top.indices.tolist(), top.values.tolist()):
            assert alts[f"token_id:{i}"] == pytest.approx(v, abs=1e-4)


def test_seed_gives_the_same_tokens_alone_and_under_concurrent_load(url, client):
    def ask(seed, prompt="The seed", tokens=10):
        r = httpx.post(f"{url}/v1/completions", headers=headers(), timeout=60,
                       json={"prompt": prompt, "max_tokens": tokens, "seed": seed, "n": 2, "return_token_ids": True})
        r.raise_for_status()
        return [c["token_ids"] for c in r.json()["choices"]]

    alone = ask(123)
    with ThreadPoolExecutor(16) as pool:
        noise = [pool.submit(ask, s, f"other prompt {s}", 5 + s % 7) for s in range(40)]
        loaded = [pool.submit(ask, 123) for _ in range(4)]
        assert all(f.result() == alone for f in loaded)
        assert all(len(f.result()) == 2 for f in noise)


def test_chat_completions_equal_in_process_chat(client, reference):
    messages = [{"role": "user", "content": "Say hi"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, seed=3, n=2,
                                         logprobs=True, top_logprobs=2, extra_body={"return_token_ids": True})
    ref = reference.chat(messages, SamplingParams(n=2, max_tokens=6, seed=3))[0]
    for choice, sample in zip(out.choices, ref.outputs):
        assert choice.message.role == "assistant" and choice.message.content == sample.text
        assert extra(choice, "token_ids") == sample.token_ids
        assert [t.logprob for t in choice.logprobs.content] == pytest.approx(sample.logprobs, abs=1e-5)
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)


def test_streaming_completions_and_chat_equal_the_whole_response(client, reference):
    whole = client.completions.create(model="tiny", prompt="Stream me", max_tokens=12, seed=5, n=2,
                                      extra_body={"return_token_ids": True})
    texts, ids, reasons = ["", ""], [[], []], [None, None]
    for chunk in client.completions.create(model="tiny", prompt="Stream me", max_tokens=12, seed=5, n=2, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_body={"return_token_ids": True}):
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == sum(map(len, ids))
        for c in chunk.choices:
            texts[c.index] += c.text
            ids[c.index] += extra(c, "token_ids")
            reasons[c.index] = c.finish_reason or reasons[c.index]
    for k, choice in enumerate(whole.choices):
        assert ids[k] == extra(choice, "token_ids") and texts[k] == choice.text and reasons[k] == choice.finish_reason
    messages = [{"role": "user", "content": "Stream chat"}]
    ref = reference.chat(messages, SamplingParams(max_tokens=8, seed=9))[0].outputs[0]
    content = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, seed=9, stream=True) if c.choices)
    assert content == ref.text


def test_sample_tree_equals_in_process_sample_tree(url, reference):
    body = {"prompts": ["Tree one", [70, 71, 72]], "trees": 2, "forks": 2, "branches": 2, "max_tokens": 10,
            "seed": 11, "temperature": 1.0}
    r = httpx.post(f"{url}/v1/sample_tree", json=body, headers=headers(), timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    tp = TreeParams(trees=2, forks=2, branches=2)
    for i, prompt in enumerate(body["prompts"]):
        ref = reference.sample_tree([prompt], tp, SamplingParams(max_tokens=10, seed=11 + i))[0]
        got = results[i]
        assert got["seed"] == 11 + i and got["fork_positions"] == ref.fork_positions
        assert [leaf["token_ids"] for leaf in got["leaves"]] == [leaf.token_ids for leaf in ref.leaves]
        assert [tuple(leaf["origin"].values()) for leaf in got["leaves"]] == [leaf.origin for leaf in ref.leaves]
        assert got["stats"]["leaves"] == len(ref.leaves) == len(got["leaves"])
        assert got["leaves"][0]["entropies"] == pytest.approx(ref.leaves[0].entropies, abs=1e-5)


def test_info_routes(url):
    assert httpx.get(f"{url}/health", headers=headers()).json() == {"status": "ok"}
    assert httpx.get(f"{url}/v1/models", headers=headers()).json()["data"][0]["id"] == "tiny"
    assert httpx.get(f"{url}/get_world_size", headers=headers()).json() == {"world_size": 1}
    assert httpx.get(f"{url}/get_weight_version", headers=headers()).json() == {"weight_version": "0",
                                                                               "weight_version_name": None}


BAD = {
    "malformed JSON": (b'{"prompt": "x", ', 400, "malformed JSON"),
    "not UTF-8": (b'{"prompt": "\xff\xfe"}', 400, "not UTF-8"),
    "not an object": (b'[1, 2]', 400, "JSON object"),
    "negative max_tokens": ({"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    "huge max_tokens": ({"prompt": "x", "max_tokens": 10**12}, 400, "maximum context length"),
    "n = 0": ({"prompt": "x", "n": 0}, 400, "n"),
    "n = 10**6": ({"prompt": "x", "n": 10**6}, 400, "n"),
    "prompt longer than the model": ({"prompt": [65] * 200}, 400, "max length"),
    "token id outside the vocabulary": ({"prompt": [65, 300]}, 400, "token ids must be in"),
    "negative token id": ({"prompt": [-1, 65]}, 400, "token ids must be in"),
    "empty text prompt": ({"prompt": ""}, 400, "empty prompt"),
    "empty prompt list": ({"prompt": []}, 400, "prompt is empty"),
    "wrong type": ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    "top_p = 0": ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    "echo": ({"prompt": "x", "echo": True}, 400, "echo"),
    "unknown model": ({"prompt": "x", "model": "gpt-5"}, 404, "does not exist"),
    "stop that is empty": ({"prompt": "x", "stop": [""]}, 400, "stop"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_answers_4xx_and_the_server_keeps_serving(url, server, case):
    body, status, words = BAD[case]
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{url}/v1/completions", headers={**headers(), "Content-Type": "application/json"}, timeout=60,
                   **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert_idle_and_clean(server)
    ok = httpx.post(f"{url}/v1/completions", headers=headers(), json={"prompt": "ok", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_wrong_or_missing_api_key_is_refused(url, server):
    for h in (headers("wrong"), {}):
        r = httpx.post(f"{url}/v1/completions", headers=h, json={"prompt": "x"})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(model="tiny", prompt="x")
    assert_idle_and_clean(server)


def test_unknown_fields_are_ignored_with_a_warning(url, server, caplog):
    r = httpx.post(f"{url}/v1/completions", headers=headers(), timeout=60,
                   json={"prompt": "x", "max_tokens": 2, "best_of_everything": 3})
    assert r.status_code == 200
    assert "best_of_everything" in caplog.text
    server.config.reject_unknown_fields = True
    try:
        r = httpx.post(f"{url}/v1/completions", headers=headers(), json={"prompt": "x", "best_of_everything": 3})
        assert r.status_code == 400 and "best_of_everything" in r.json()["error"]["message"]
    finally:
        server.config.reject_unknown_fields = False
    assert_idle_and_clean(server)


def test_bounded_load_with_cancelled_streams(url, server, reference):
    """200 requests from 32 concurrent clients (completions with n = 1..3, every 10th a sample_tree), every 8th a
    stream the client drops after two chunks: every other request completes with its own seed's tokens (none
    lost, none swapped), and the KV pool returns to idle."""
    num_requests, num_clients = 200, 32
    rng = random.Random(0)
    jobs = [(i, f"load {i} {'x' * rng.randrange(0, 12)}", 3 + rng.randrange(6), i % 8 == 7)
            for i in range(num_requests)]
    results: dict[int, list[int]] = {}

    async def one(http, i, prompt, max_tokens, cancel):
        body = {"prompt": prompt, "max_tokens": max_tokens, "seed": 1000 + i, "return_token_ids": True}
        if cancel:
            body.update(max_tokens=80, stream=True, ignore_eos=True)
            async with http.stream("POST", "/v1/completions", json=body) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data:")
                    if seen == 2:
                        break  # leaving the block closes the connection mid-stream
            return
        assert i not in results
        if i % 10 == 3:  # tree requests share the batch too
            r = await http.post("/v1/sample_tree", json={**body, "prompts": [prompt], **TREE})
            assert r.status_code == 200, r.text
            results[i] = [leaf["token_ids"] for leaf in r.json()["results"][0]["leaves"]]
            return
        r = await http.post("/v1/completions", json={**body, "n": 1 + i % 3})
        assert r.status_code == 200, r.text
        results[i] = [c["token_ids"] for c in r.json()["choices"]]

    async def main():
        queue = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)

        async def worker():
            async with httpx.AsyncClient(base_url=url, headers=headers(), timeout=120) as http:
                while not queue.empty():
                    await one(http, *queue.get_nowait())

        await asyncio.wait_for(asyncio.gather(*[worker() for _ in range(num_clients)]), 600)

    asyncio.run(main())
    kept = [(i, p, t) for i, p, t, cancel in jobs if not cancel]
    assert sorted(results) == [i for i, *_ in kept]
    plain = [(i, p, t) for i, p, t in kept if i % 10 != 3]
    expected = reference.generate([p for _, p, _ in plain],
                                  [SamplingParams(n=1 + i % 3, max_tokens=t, seed=1000 + i) for i, _, t in plain])
    assert [results[i] for i, *_ in plain] == [[s.token_ids for s in out.outputs] for out in expected]
    for i, p, t in kept:
        if i % 10 == 3:
            tree = reference.sample_tree([p], TreeParams(**TREE), SamplingParams(max_tokens=t, seed=1000 + i))[0]
            assert results[i] == [leaf.token_ids for leaf in tree.leaves]
    assert_idle_and_clean(server)


def test_a_client_that_disconnects_frees_its_sequences(url, server, monkeypatch):
    """Steps slowed to 5 ms: a stream dropped after two chunks and a plain request whose client times out are
    aborted long before their 80 tokens, and their KV blocks are free again."""
    import time
    step = server.engine.step
    monkeypatch.setattr(server.engine, "step", lambda: (time.sleep(0.005), step())[1])
    before = server.engine.num_decode_tokens
    body = {"prompt": "drop me", "max_tokens": 80, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers(), timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 2:
                break
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", headers=headers(), timeout=0.1,
                   json={"prompt": "time out", "max_tokens": 80, "ignore_eos": True})
    assert_idle_and_clean(server)
    assert server.engine.num_decode_tokens - before < 100  # both to the end would decode 158


@pytest.mark.integration
def test_default_model_through_the_server_equals_in_process_chat():
    """The real default model (SmolLM2-135M-Instruct) served over HTTP: chat with its own template, n=2."""
    name, engine = "smollm2-135m-instruct", {"dtype": "float32", "kv_cache_tokens": 4096}
    messages = [{"role": "user", "content": "What is 12 + 30? Answer with a number."}]
    ref = LLM(name, **engine).chat(messages, SamplingParams(n=2, max_tokens=24, seed=0, temperature=0.7))[0]
    server = Server(LLM(name, **engine), ServerConfig(name))
    with running(server.app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
        out = client.chat.completions.create(model=name, messages=messages, n=2, max_tokens=24, seed=0,
                                             temperature=0.7, extra_body={"return_token_ids": True})
        assert_idle_and_clean(server)
    for choice, sample in zip(out.choices, ref.outputs):
        assert extra(choice, "token_ids") == sample.token_ids and choice.message.content == sample.text


@pytest.mark.parametrize("bad", [{"logprobs": -1}, {"logprobs_mode": "raw_logits"}])
def test_sampling_params_check_the_logprobs_fields(bad):
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(**bad)
