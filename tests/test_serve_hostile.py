"""engine.serve against hostile or heavy clients, over real HTTP on 127.0.0.1: one request can never fail, freeze or
stall the others. Poison parameters are refused (and a step that fails anyway fails only its own request), text
prompts are bounded in characters and tokenized off the event loop, fan-out and the queue are capped, every
error is OpenAI's envelope, web pages cannot post to the server, and the fields the engine does not implement are
refused. Tokens are checked against a second, in-process engine on the same weights."""
import asyncio
import json
import logging
import threading
import time

import httpx
import openai
import pytest

from engine import LLM, SamplingParams
from engine.serve.api_server import Server, ServerConfig
from serve_util import idle_and_clean, make_chat_model, running, slow_steps

KEY = "hostile-key"
ENGINE = {"dtype": "float32", "block_size": 4, "num_kv_blocks": 512, "max_model_len": 96}
VOCAB = 300
AUTH = {"Authorization": f"Bearer {KEY}"}
BYSTANDERS = [("bystander one", 101), ("bystander two", 102), ("bystander three", 103), ("bystander four", 104)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile_model")
    make_chat_model(path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    return LLM(model_dir, **ENGINE)


@pytest.fixture(scope="module")
def server(model_dir):
    return Server(LLM(model_dir, **ENGINE), ServerConfig("tiny", api_key=KEY))


@pytest.fixture(scope="module")
def url(server):
    with running(server.app) as base:
        yield base


def post(url, path, body=None, headers=None, **kwargs):
    kwargs.setdefault("timeout", 60)
    if body is not None:
        kwargs["json"] = body
    return httpx.post(url + path, headers={**AUTH, **(headers or {})}, **kwargs)


def assert_envelope(r, status, words):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["code"] == status, error


def alone(reference, prompt, seed, tokens=24):
    out = reference.generate([prompt], SamplingParams(n=2, max_tokens=tokens, seed=seed, temperature=0.8,
                                                      ignore_eos=True))[0]
    return [s.token_ids for s in out.outputs]


def bystander_body(prompt, seed, tokens=24, stream=False):
    return {"prompt": prompt, "n": 2, "max_tokens": tokens, "seed": seed, "temperature": 0.8, "ignore_eos": True,
            "return_token_ids": True, "stream": stream}


async def bystander(http, prompt, seed, stream):
    """A well-behaved client: the token ids of its two samples, streamed or whole."""
    body = bystander_body(prompt, seed, stream=stream)
    if not stream:
        r = await http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return [c["token_ids"] for c in r.json()["choices"]]
    ids = [[], []]
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for c in chunk["choices"]:
                    ids[c["index"]] += c["token_ids"]
    return ids


def with_bystanders(url, hostile):
    """Runs the four bystanders (two streaming) beside hostile(http) -> its responses; returns both."""
    async def main():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as http:
            calm = [asyncio.create_task(bystander(http, p, s, stream=i % 2 == 1))
                    for i, (p, s) in enumerate(BYSTANDERS)]
            await asyncio.sleep(0.05)  # they are in flight when the hostile request comes
            bad = await hostile(http)
            return await asyncio.gather(*calm), bad
    return asyncio.run(main())


# ---- 1. poison parameters, a failing step --------------------------------------------------------------------
POISON = {
    "top_k = 2**63": ({"top_k": 2**63}, "top_k"),
    "top_k past the vocabulary": ({"top_k": 2**62}, "vocabulary"),
    "temperature = 1e-40": ({"temperature": 1e-40}, "temperature"),
    "temperature = NaN": ({"temperature": float("nan")}, "temperature"),
    "top_p = NaN": ({"top_p": float("nan")}, "top_p"),
}


@pytest.mark.parametrize("case", list(POISON))
def test_poison_parameters_are_refused_and_bystanders_get_their_tokens(url, server, reference, monkeypatch, case):
    fields, words = POISON[case]
    slow_steps(server, monkeypatch)

    async def hostile(http):
        body = json.dumps({"prompt": "poison", "max_tokens": 8, **fields})  # NaN as JSON's NaN, which Python reads
        return await http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})

    calm, bad = with_bystanders(url, hostile)
    assert_envelope(bad, 400, words)
    assert calm == [alone(reference, p, s) for p, s in BYSTANDERS]
    idle_and_clean(server)


def test_a_failing_step_fails_only_the_request_that_causes_it(url, server, reference, monkeypatch):
    """A request whose rows make the sampler raise (seed 666 here, standing for any input the checks miss): it
    answers 500, the bystanders (streaming or not, and a tree request) get exactly their tokens."""
    slow_steps(server, monkeypatch)
    sample = server.engine._sample

    def poisoned(logits, rows):
        if any(seq.seed == 666 for seq, _ in rows):
            raise RuntimeError("Overflow when unpacking long long")
        return sample(logits, rows)

    monkeypatch.setattr(server.engine, "_sample", poisoned)
    tree = {"prompts": ["tree bystander"], "trees": 2, "forks": 1, "branches": 2, "max_tokens": 10, "seed": 7}

    async def hostile(http):
        tree_task = asyncio.create_task(http.post("/v1/sample_tree", json=tree))
        await asyncio.sleep(0.05)
        bad = await http.post("/v1/completions", json={"prompt": "poison", "max_tokens": 8, "seed": 666, "n": 3})
        return bad, await tree_task

    calm, (bad, tree_answer) = with_bystanders(url, hostile)
    assert_envelope(bad, 500, "Overflow")
    assert calm == [alone(reference, p, s) for p, s in BYSTANDERS]
    from engine import TreeParams
    ref = reference.sample_tree(tree["prompts"], TreeParams(2, 1, 2), SamplingParams(max_tokens=10, seed=7))[0]
    assert tree_answer.status_code == 200, tree_answer.text
    assert [leaf["token_ids"] for leaf in tree_answer.json()["results"][0]["leaves"]] == \
        [leaf.token_ids for leaf in ref.leaves]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    idle_and_clean(server)


@pytest.mark.parametrize("bad", [{"temperature": 1e-40}, {"temperature": float("inf")}, {"temperature": float("nan")},
                                 {"top_k": 2**63}, {"top_p": float("nan")}])
def test_sampling_params_refuse_what_the_engine_cannot_take(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_top_k_past_the_vocabulary_is_refused_in_process(reference):
    with pytest.raises(ValueError, match="vocabulary size 300"):
        reference.generate([[65, 66]], SamplingParams(top_k=VOCAB + 1, max_tokens=2))
    assert reference.generate([[65, 66]], SamplingParams(top_k=VOCAB, max_tokens=2, seed=1))[0].outputs[0].token_ids
    reference.check_integrity()


# ---- 2. huge prompts ---------------------------------------------------------------------------------------------
def test_a_long_text_prompt_is_refused_by_its_characters_before_tokenizing(url, server, monkeypatch):
    calls = []
    encode = server.llm.encode
    monkeypatch.setattr(server.llm, "encode", lambda text: (calls.append(len(text)), encode(text))[1])
    chars = server.limits.prompt_chars  # 96 tokens x 5 characters ("<eos>")
    assert chars == 96 * 5
    r = post(url, "/v1/completions", {"prompt": "x" * (chars + 1), "max_tokens": 2})
    assert_envelope(r, 400, f"no text longer than {chars} characters")
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * (chars + 1)}]})
    assert_envelope(r, 400, "the conversation has")
    assert calls == []
    idle_and_clean(server)


def test_the_default_body_cap_is_what_the_longest_prompt_needs(url, server):
    assert server.limits.body_bytes == 96 * 5 * 6 + 2**20
    r = post(url, "/v1/completions", content=b" " * (2 * 2**20), headers={"Content-Type": "application/json"})
    assert_envelope(r, 413, "exceeds the limit")


def test_tokenizing_runs_off_the_event_loop(url, server, monkeypatch):
    """A tokenization that takes 1.5 s (a long text on a slow tokenizer): /health answers meanwhile."""
    encode = server.llm.encode
    monkeypatch.setattr(server.llm, "encode", lambda text: (time.sleep(1.5), encode(text))[1])
    thread = threading.Thread(target=post, args=(url, "/v1/completions", {"prompt": "slow", "max_tokens": 2}))
    thread.start()
    time.sleep(0.3)
    start = time.monotonic()
    assert httpx.get(url + "/health", timeout=5).json() == {"status": "ok"}
    assert time.monotonic() - start < 0.5
    thread.join(30)


def stream_chunks(url, body):
    """The data chunks of a streamed /v1/completions request, parsed."""
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=60) as r:
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def test_a_long_stream_decodes_only_its_newest_tokens_per_chunk(url, server, monkeypatch):
    """A stream of 90 tokens: its chunks decode a few tokens each (the whole text once, at the end), so a long
    stream does not cost the event loop time quadratic in its length; the text equals the whole response's."""
    tokenizer = server.llm.tokenizer
    decode, lengths = tokenizer.decode, []
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: (lengths.append(len(ids)), decode(ids, **kw))[1])
    body = {"prompt": [65, 66], "max_tokens": 90, "ignore_eos": True, "seed": 2, "stop": ["\x00\x00"]}
    text = "".join(c["choices"][0]["text"] for c in stream_chunks(url, body))
    assert sum(n > 30 for n in lengths) <= 2, sorted(lengths)[-12:]  # the final text; the whole response
    assert text == post(url, "/v1/completions", body).json()["choices"][0]["text"]


# ---- 3. fan-out and floods ---------------------------------------------------------------------------------------
FAN_OUT = {
    "tree leaves": ("/v1/sample_tree", {"prompts": [[65, 66]], "trees": 64, "forks": 2, "branches": 4,
                                        "max_tokens": 2}, "1 prompts x 576 leaves"),
    "prompts x n": ("/v1/completions", {"prompt": [[65]] * 40, "n": 13, "max_tokens": 2}, "40 prompts x n = 13"),
    "chat n": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 513,
                                        "max_tokens": 2}, "n = 513"),
}


@pytest.mark.parametrize("case", list(FAN_OUT))
def test_fan_out_past_the_limit_is_refused_before_anything_is_built(url, server, monkeypatch, case):
    """The default limit is the KV pool's blocks (512 here): 576 leaves, 520 samples, n = 513 are refused."""
    route, body, words = FAN_OUT[case]
    built = []
    make = server.engine.make_sequences
    monkeypatch.setattr(server.engine, "make_sequences", lambda *a, **k: (built.append(1), make(*a, **k))[1])
    r = post(url, route, body)
    assert_envelope(r, 400, "--max-sequences-per-request")
    assert words in r.json()["error"]["message"] and built == []
    idle_and_clean(server)


def test_a_full_queue_answers_429_with_retry_after(model_dir):
    server = Server(LLM(model_dir, **ENGINE), ServerConfig("tiny", max_queued_requests=2))
    with running(server.app) as base:
        server.loop.pause("wait").result(10)  # nothing starts: every request stays queued
        threads = [threading.Thread(target=httpx.post, args=(base + "/v1/completions",),
                                    kwargs={"json": {"prompt": [65], "max_tokens": 2}, "timeout": 60})
                   for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while server.loop.num_queued < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.post(base + "/v1/completions", json={"prompt": [65], "max_tokens": 2})
        assert_envelope(r, 429, "--max-queued-requests")
        assert r.headers["Retry-After"] == "1"
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0).completions.create(model="tiny",
                                                                                               prompt="x")
        server.loop.resume().result(10)
        for t in threads:
            t.join(30)
        assert server.loop.num_queued == 0
        assert httpx.post(base + "/v1/completions", json={"prompt": [65], "max_tokens": 2}).status_code == 200
        idle_and_clean(server)


# ---- 5. every error in OpenAI's envelope ----------------------------------------------------------------------------
def test_lone_surrogates_answer_400(url, server):
    body = b'{"prompt": "a\\ud800b", "max_tokens": 2}'
    r = post(url, "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert_envelope(r, 400, "surrogate")
    body = b'{"messages": [{"role": "user", "content": "\\udfff"}]}'
    r = post(url, "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert_envelope(r, 400, "surrogate")
    idle_and_clean(server)


def test_fastapi_errors_and_unexpected_ones_come_in_the_envelope(url, server, monkeypatch):
    assert_envelope(httpx.get(url + "/v1/nothing", headers=AUTH), 404, "Not Found")
    assert_envelope(httpx.get(url + "/v1/completions", headers=AUTH), 405, "Method Not Allowed")
    monkeypatch.setattr(server.fmt, "response", lambda *a: 1 / 0)
    r = post(url, "/v1/completions", {"prompt": [65], "max_tokens": 2})
    assert_envelope(r, 500, "ZeroDivisionError")
    assert post(url, "/v1/completions", {"prompt": [65], "max_tokens": 2, "stream": True}).status_code == 200


def test_deeply_nested_json_answers_400(url):
    body = b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    r = post(url, "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert_envelope(r, 400, "nests")


# ---- 6. web pages ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_json_routes_need_a_json_content_type(url, server, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    r = httpx.post(url + "/v1/completions", content=b'{"prompt": [65], "max_tokens": 2}', headers={**AUTH, **headers})
    assert_envelope(r, 415, "Content-Type: application/json")
    ok = {"Content-Type": "application/json; charset=utf-8"}
    r = httpx.post(url + "/v1/completions", content=b'{"prompt": [65], "max_tokens": 2}', headers={**AUTH, **ok})
    assert r.status_code == 200
    idle_and_clean(server)


@pytest.mark.parametrize("header, value, status", [
    ("Host", "evil.example", 400), ("Host", "127.0.0.1.evil.example", 400), ("Host", "", 400),
    ("Origin", "http://evil.example", 403), ("Origin", "null", 403), ("Origin", "http://localhost.evil.example", 403),
    ("Host", "localhost:1234", 200), ("Host", "[::1]", 200), ("Origin", "http://127.0.0.1:8000", 200),
    ("Origin", "https://localhost", 200), ("Host", "proxy.example", 400)])
def test_a_loopback_server_answers_only_loopback_hosts_and_origins(url, header, value, status):
    r = post(url, "/v1/completions", {"prompt": [65], "max_tokens": 2}, headers={header: value})
    assert r.status_code == status, r.text
    if status != 200:
        assert "not allowed" in r.json()["error"]["message"]


def test_a_non_loopback_server_checks_allowed_hosts_and_warns_without_a_key(model_dir, caplog):
    llm = LLM(model_dir, **ENGINE)
    with caplog.at_level(logging.WARNING, logger="engine.serve"):
        Server(llm, ServerConfig("tiny", host="0.0.0.0"))
    assert "WITHOUT an API key" in caplog.text
    server = Server(llm, ServerConfig("tiny", host="10.0.0.5", api_key=KEY, allowed_hosts=["node-7", "10.0.0.5"]))
    with running(server.app) as base:
        for host, status in [("node-7:8000", 200), ("10.0.0.5", 200), ("127.0.0.1", 400), ("evil.example", 400)]:
            r = post(base, "/v1/completions", {"prompt": [65], "max_tokens": 2}, headers={"Host": host})
            assert r.status_code == status, (host, r.text)
        r = post(base, "/v1/completions", {"prompt": [65], "max_tokens": 2},
                 headers={"Host": "node-7", "Origin": "http://evil.example"})
        assert r.status_code == 403
    behind_a_proxy = Server(llm, ServerConfig("tiny", allowed_hosts=["proxy.example"]))  # a loopback bind
    with running(behind_a_proxy.app) as base:
        for host, status in [("proxy.example", 200), ("localhost", 200), ("evil.example", 400)]:
            r = post(base, "/v1/completions", {"prompt": [65], "max_tokens": 2}, headers={"Host": host})
            assert r.status_code == status, (host, r.text)


# ---- 8. compatibility ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, ok", [
    ("frequency_penalty", 0.5, False), ("frequency_penalty", 0, True), ("presence_penalty", -1.0, False),
    ("logit_bias", {"65": 10}, False), ("logit_bias", {}, True), ("best_of", 3, False), ("best_of", 1, True),
    ("repetition_penalty", 1.1, False), ("min_p", 0.1, False), ("min_tokens", 4, False),
    ("use_beam_search", True, False), ("response_format", {"type": "json_object"}, False),
    ("response_format", {"type": "text"}, True), ("suffix", "end", False)])
def test_sampling_fields_the_engine_does_not_implement_answer_400(url, field, value, ok):
    r = post(url, "/v1/completions", {"prompt": [65], "max_tokens": 2, field: value})
    if ok:
        assert r.status_code == 200, r.text
    else:
        assert_envelope(r, 400, f"does not implement {field}")


def test_chat_content_given_as_text_parts_is_flattened(url, reference):
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": parts}], "max_tokens": 6,
                                           "seed": 3, "return_token_ids": True})
    assert r.status_code == 200, r.text
    ref = reference.chat([{"role": "user", "content": "Say\nhi"}], SamplingParams(max_tokens=6, seed=3))[0]
    assert r.json()["choices"][0]["token_ids"] == ref.outputs[0].token_ids
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": image}]})
    assert_envelope(r, 400, "messages.0.content")


def test_stop_reason_names_the_stop_token_or_string(url, reference):
    ids = reference.generate([[70, 71, 72]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    ids = ids.outputs[0].token_ids
    token = ids[5]
    base = {"prompt": [70, 71, 72], "max_tokens": 12, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    choice = post(url, "/v1/completions", {**base, "stop_token_ids": [token]}).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == token
    assert choice["token_ids"] == ids[:ids.index(token) + 1]
    text = reference.decode(ids)
    stop = next(ch for ch in text[2:] if ch.isprintable() and ch != "\ufffd")
    choice = post(url, "/v1/completions", {**base, "stop": ["\x00never", stop]}).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    last = stream_chunks(url, {**base, "stop": [stop]})[-1]
    assert last["choices"][0]["finish_reason"] == "stop" and last["choices"][0]["stop_reason"] == stop
    choice = post(url, "/v1/completions", {**base, "max_tokens": 3}).json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None


def test_stop_regex_and_include_stop_str_in_output_equal_in_process_generate(url, reference):
    """stop_regex (SGLang's name) and include_stop_str_in_output (vLLM's) through the server, streamed or not,
    give LLM.generate's text, tokens and stop_reason; a catastrophic pattern costs nothing special."""
    prompt, seed = "regex stop", 5
    free = reference.generate([prompt], SamplingParams(max_tokens=30, seed=seed, ignore_eos=True))[0].outputs[0]
    text = free.text
    pattern = "".join(f"[{c}]" if c.isalnum() else "." for c in text[3:6])  # three characters seen in the text
    for include in (False, True):
        params = SamplingParams(max_tokens=30, seed=seed, ignore_eos=True, stop_regex=[pattern, "(a+)+$"],
                                include_stop_str_in_output=include)
        ref = reference.generate([prompt], params)[0].outputs[0]
        body = {"prompt": prompt, "max_tokens": 30, "seed": seed, "ignore_eos": True, "return_token_ids": True,
                "stop_regex": [pattern, "(a+)+$"], "include_stop_str_in_output": include}
        choice = post(url, "/v1/completions", body).json()["choices"][0]
        assert (choice["text"], choice["token_ids"], choice["finish_reason"], choice["stop_reason"]) == \
            (ref.text, ref.token_ids, ref.finish_reason, ref.stop_reason)
        chunks = stream_chunks(url, body)
        last = chunks[-1]["choices"][0]
        assert (last["finish_reason"], last["stop_reason"]) == (ref.finish_reason, ref.stop_reason)
        assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text


@pytest.mark.parametrize("extra", [[], [r"\\boxed\{[^}]*\}", "(?:q|zz)+w"]])
def test_a_stream_never_sends_the_start_of_a_stop_regex_match(url, reference, extra):
    """A match of many characters starts mid-text and is cut (include_stop_str_in_output false): the stream holds
    back each partial match until it completes or dies, so every prefix it sent is a prefix of the final text, and
    all of it is the plain response's text."""
    prompt, seed = "stream stop", 11
    free = reference.generate([prompt], SamplingParams(max_tokens=40, seed=seed, ignore_eos=True))[0].outputs[0]
    pattern = "".join(f"[{c}]" if c.isalnum() else "." for c in free.text[8:20])  # twelve characters
    body = {"prompt": prompt, "max_tokens": 40, "seed": seed, "ignore_eos": True, "stop_regex": [pattern, *extra]}
    whole = post(url, "/v1/completions", body).json()["choices"][0]
    assert whole["finish_reason"] == "stop" and len(whole["text"]) >= 8  # the match starts mid-text
    sent = ""
    for chunk in stream_chunks(url, body):
        sent += chunk["choices"][0]["text"]
        assert whole["text"].startswith(sent)
    assert sent == whole["text"]


@pytest.mark.parametrize("field, value, words", [
    ("stop_regex", ["x"] * 17, "at most 16"), ("stop_regex", "a" * 257, "at most 256"),
    ("stop_regex", "(a)\\1", "stop_regex"), ("stop_regex", "(a{1000}){1000}", "too large"),
    ("stop", ["x"] * 17, "at most 16"), ("stop", "a" * 257, "at most 256"),
    ("stop_token_ids", list(range(257)), "at most 256")])
def test_stop_fields_are_capped_and_checked(url, field, value, words):
    assert_envelope(post(url, "/v1/completions", {"prompt": [65], "max_tokens": 2, field: value}), 400, words)


# ---- 9. smaller ------------------------------------------------------------------------------------------------------
def test_health_needs_no_key_and_says_only_ok(url):
    r = httpx.get(url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert httpx.get(url + "/v1/models").status_code == 401
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": KEY}).status_code == 401


def test_models_does_not_expose_the_model_path(url, model_dir):
    body = httpx.get(url + "/v1/models", headers=AUTH).text
    assert str(model_dir) not in body and json.loads(body)["data"][0]["root"] == "tiny"


def test_the_openai_client_sees_typed_errors(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="does not implement frequency_penalty"):
        client.completions.create(model="tiny", prompt="x", frequency_penalty=1.0)
    with pytest.raises(openai.BadRequestError, match="top_k must be at most the vocabulary"):
        client.completions.create(model="tiny", prompt="x", extra_body={"top_k": 10**6})
