"""engine.serve's state-changing routes over HTTP on 127.0.0.1: off without --enable-weight-updates; weights only
from safetensors under --weights-dir (no '..', no symlink out); updates wait for or refuse requests in flight;
no prefix computed with old weights is reused; pause/resume; cache reset."""
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import save, save_file

from engine import LLM, SamplingParams
from engine.serve.api_server import Server, ServerConfig
from serve_util import running
from tiny_models import make_tiny_model

ENGINE = {"dtype": "float32", "block_size": 4, "num_kv_blocks": 256, "max_model_len": 96}
PROMPT = list(range(65, 85))
GREEDY = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
ADMIN_ROUTES = ["/update_weights_from_disk", "/update_weights_from_tensor", "/reset_prefix_cache", "/flush_cache",
                "/pause", "/resume", "/sleep", "/wake_up"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("admin")
    make_tiny_model("llama", root / "model", tokenizer=True, seed=0)
    make_tiny_model("llama", root / "weights" / "new", seed=1)
    make_tiny_model("llama", root / "outside", seed=2)
    (root / "weights" / "link").symlink_to(root / "outside", target_is_directory=True)
    (root / "weights" / "filelink").mkdir()
    (root / "weights" / "filelink" / "model.safetensors").symlink_to(root / "outside" / "model.safetensors")
    (root / "weights" / "empty").mkdir()
    make_tiny_model("llama", root / "weights" / "same", seed=0)
    return root


def greedy_ids(llm, prompt=PROMPT):
    return llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def old_ids(dirs):
    return greedy_ids(LLM(dirs / "model", **ENGINE))


@pytest.fixture(scope="module")
def new_ids(dirs):
    # the new weights under the old model's tokenizer and config: the same architecture
    return greedy_ids(LLM(dirs / "weights" / "new", **ENGINE))


@pytest.fixture(scope="module")
def on(dirs):
    server = Server(LLM(dirs / "model", **ENGINE),
                    ServerConfig("tiny", enable_weight_updates=True, weights_dir=str(dirs / "weights")))
    with running(server.app) as url:
        yield server, httpx.Client(base_url=url, timeout=60)


OCTET = {"Content-Type": "application/octet-stream"}


def completion_ids(http):
    r = http.post("/v1/completions", json=GREEDY)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def embed(server_or_llm):
    return server_or_llm.engine.runner.model.hf_parameter_views()["model.embed_tokens.weight"].clone()


def idle_and_clean(server):
    def check():
        server.engine.check_integrity()
        assert not server.engine.live_sequences()
        kv = server.engine.kv
        assert kv.allocator.num_free + kv.tree.num_cached_blocks == kv.num_blocks
    server.loop.barrier(check).result(timeout=60)


def test_admin_routes_are_off_without_the_switch(dirs):
    server = Server(LLM(dirs / "model", **ENGINE), ServerConfig("tiny", weights_dir=str(dirs / "weights")))
    before = embed(server)
    with running(server.app) as url:
        for route in ADMIN_ROUTES:
            r = httpx.post(url + route, json={"model_path": "new"})
            assert r.status_code == 403 and "--enable-weight-updates" in r.json()["error"]["message"], route
        assert httpx.get(url + "/get_weight_version").json() == {"weight_version": "0", "weight_version_name": None}
    assert torch.equal(embed(server), before)


@pytest.mark.parametrize("path, status", [("../outside", 403), ("new/../../outside", 403), ("link", 403),
                                          ("filelink", 403), ("OUTSIDE_ABSOLUTE", 403), ("missing", 400),
                                          ("empty", 400)])
def test_paths_outside_the_weights_dir_are_refused_and_nothing_is_loaded(on, dirs, path, status):
    server, http = on
    if path == "OUTSIDE_ABSOLUTE":
        path = str(dirs / "outside")
    before, version = embed(server), http.get("/get_weight_version").json()
    r = http.post("/update_weights_from_disk", json={"model_path": path})
    assert r.status_code == status, r.text
    assert torch.equal(embed(server), before)
    assert http.get("/get_weight_version").json() == version
    idle_and_clean(server)


def test_update_from_disk_then_from_tensor_and_no_stale_prefix(on, dirs, old_ids, new_ids):
    server, http = on
    assert completion_ids(http) == old_ids          # its prefix is now cached (old weights)
    version = int(http.get("/get_weight_version").json()["weight_version"])
    r = http.post("/update_weights_from_disk", json={"model_path": "new"})
    assert r.status_code == 200 and r.json()["success"], r.text
    assert r.json()["weight_version"] == str(version + 1)
    assert completion_ids(http) == new_ids          # no prefix computed with the old weights was reused
    old = LLM(dirs / "model", **ENGINE).engine.runner.model.hf_parameter_views()
    body = save({name: t.contiguous() for name, t in old.items()})
    r = http.post("/update_weights_from_tensor", content=body, headers=OCTET)
    assert r.status_code == 200 and r.json()["weight_version"] == str(version + 2), r.text
    assert completion_ids(http) == old_ids
    idle_and_clean(server)


def test_bad_tensor_bodies_are_refused(on):
    server, http = on
    before = embed(server)
    for body, status, words in [(b"not safetensors", 400, "not a safetensors"),
                                (save({"model.nope.weight": torch.zeros(2)}), 400, "unknown parameter name"),
                                (save({"model.embed_tokens.weight": torch.zeros(3, 3)}), 400, "shape")]:
        r = http.post("/update_weights_from_tensor", content=body, headers=OCTET)
        assert r.status_code == status and words in r.json()["error"]["message"], r.text
    server.config.max_weights_body_gb = 1e-6  # ~1 KB
    try:
        r = http.post("/update_weights_from_tensor", content=save({"model.embed_tokens.weight": before}), headers=OCTET)
        assert r.status_code == 413
    finally:
        server.config.max_weights_body_gb = 16.0
    assert torch.equal(embed(server), before)
    idle_and_clean(server)


def slow_steps(server, monkeypatch, seconds=0.005):
    step = server.engine.step
    monkeypatch.setattr(server.engine, "step", lambda: (time.sleep(seconds), step())[1])


def in_background(fn):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
    thread.start()
    return thread, result


def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_updates_refuse_or_wait_while_requests_are_in_flight(on, old_ids, monkeypatch):
    server, http = on
    slow_steps(server, monkeypatch)
    body = save(server.engine.runner.model.hf_parameter_views())  # the same weights: outputs stay old_ids
    long = dict(GREEDY, max_tokens=60)
    thread, result = in_background(lambda: httpx.post(http.base_url.join("/v1/completions"), json=long, timeout=60))
    wait_until(lambda: server.loop.active)
    r = http.post("/update_weights_from_tensor?if_busy=refuse", content=body, headers=OCTET)
    assert r.status_code == 409 and "in flight" in r.json()["error"]["message"]
    r = http.post("/update_weights_from_tensor?if_busy=wait", content=body, headers=OCTET)
    assert r.status_code == 200
    assert not thread.is_alive() or thread.join(5) is None
    done = result["value"]
    assert done.status_code == 200 and len(done.json()["choices"][0]["token_ids"]) == 60
    assert done.json()["choices"][0]["token_ids"][:8] == old_ids
    idle_and_clean(server)


def test_pause_resume_and_abort(on, monkeypatch):
    server, http = on
    assert http.post("/pause?mode=wait").json()["paused"]
    thread, result = in_background(lambda: httpx.post(http.base_url.join("/v1/completions"), json=GREEDY, timeout=60))
    wait_until(lambda: server.loop.held)  # held while paused (it reaches the loop after tokenizing in a thread)
    assert thread.is_alive()
    assert not http.post("/resume").json()["paused"]
    thread.join(30)
    assert result["value"].status_code == 200
    slow_steps(server, monkeypatch)
    thread, result = in_background(lambda: httpx.post(http.base_url.join("/v1/completions"),
                                                      json=dict(GREEDY, max_tokens=70), timeout=60))
    wait_until(lambda: server.loop.active)
    assert http.post("/pause?mode=abort").status_code == 200
    thread.join(30)
    assert result["value"].status_code == 503 and "abort" in result["value"].json()["error"]["message"]
    http.post("/resume")
    assert http.post("/pause?mode=later").status_code == 400
    idle_and_clean(server)


def test_reset_prefix_cache_and_sleep(on):
    server, http = on
    completion_ids(http)
    assert server.engine.kv.tree.num_cached_blocks > 0
    for route in ("/reset_prefix_cache", "/flush_cache"):
        assert http.post(route).json()["success"]
    assert server.engine.kv.tree.num_cached_blocks == 0
    r = http.post("/sleep?level=1")
    assert r.status_code == 200, r.text
    asleep = http.post("/v1/completions", json=GREEDY)
    assert asleep.status_code == 503 and "wake_up" in asleep.json()["error"]["message"]
    bad = http.post("/wake_up?tags=optimizer")
    assert bad.status_code == 400 and "unknown wake_up tags" in bad.json()["error"]["message"]
    assert http.post("/wake_up?tags=weights").json() == {"success": True, "sleeping": True}  # no KV pool yet
    assert server.engine.asleep
    assert http.post("/wake_up?tags=kv_cache").json() == {"success": True, "sleeping": False}
    completion_ids(http)
    idle_and_clean(server)


def test_the_command_line_server_starts_serves_and_stops(dirs):
    """python -m engine.serve in a subprocess on 127.0.0.1 (a free port), always terminated."""
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "engine.serve", "--model", str(dirs / "model"), "--dtype", "float32",
           "--port", str(port), "--kv-cache-memory-gb", "0.01", "--api-key", "k", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{url}/health", headers=auth, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(f"{url}/v1/completions", headers=auth, json=GREEDY, timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 8
        assert httpx.get(f"{url}/v1/models").status_code == 401
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def version(http):
    return http.get("/get_weight_version").json()


@pytest.mark.parametrize("bad, words", [
    ({"model.norm.weight": torch.full((64,), float("nan"))}, "NaN or infinite"),
    ({"model.norm.weight": torch.full((64,), float("inf"))}, "NaN or infinite"),
    ({"model.norm.weight": torch.ones(64, dtype=torch.int64)}, "not a floating-point type"),
    ({"model.norm.weight": torch.ones(64, dtype=torch.bool)}, "not a floating-point type")])
def test_non_finite_or_non_float_weights_are_refused_before_anything_is_written(on, dirs, old_ids, bad, words):
    """From a tensor body, from disk and in process: 400 / ValueError, the version and every weight unchanged,
    generation as before."""
    server, http = on
    before, v = embed(server), version(http)
    good = {"model.embed_tokens.weight": torch.zeros_like(before)}  # comes first: would be written first
    r = http.post("/update_weights_from_tensor", content=save({**good, **bad}), headers=OCTET)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    folder = dirs / "weights" / f"bad-{bad['model.norm.weight'].dtype}-{float(bad['model.norm.weight'][0])}"
    folder.mkdir(exist_ok=True)
    save_file({**good, **bad}, str(folder / "model.safetensors"))
    r = http.post("/update_weights_from_disk", json={"model_path": folder.name})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    llm = LLM(dirs / "model", **ENGINE)
    with pytest.raises(ValueError, match=words):
        llm.update_weights({**good, **bad})
    assert torch.equal(embed(llm), embed(LLM(dirs / "model", **ENGINE)))
    assert torch.equal(embed(server), before) and version(http) == v
    assert completion_ids(http) == old_ids
    assert http.get("/health").json() == {"status": "ok"}
    idle_and_clean(server)


def test_health_says_unhealthy_when_the_model_stops_giving_finite_logits(on, old_ids):
    """Finite weights can still overflow (a norm weight of 3e38): the update is taken, /health answers 503
    {"status": "unhealthy"} until good weights come back."""
    server, http = on
    views = server.engine.runner.model.hf_parameter_views()
    good = views["model.norm.weight"].clone()
    huge = save({"model.norm.weight": torch.full_like(good, 3e38)})
    assert http.post("/update_weights_from_tensor", content=huge, headers=OCTET).status_code == 200
    r = http.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "unhealthy"}
    r = http.post("/update_weights_from_tensor", content=save({"model.norm.weight": good}), headers=OCTET)
    assert r.status_code == 200
    assert http.get("/health").json() == {"status": "ok"}
    assert completion_ids(http) == old_ids
    idle_and_clean(server)


def test_weight_version_always_advances_and_names_are_kept_beside_it(on):
    server, http = on
    body = save(server.engine.runner.model.hf_parameter_views())  # the same weights
    start = int(version(http)["weight_version"])
    for i, name in enumerate(["step-9", "step-3", None], start=1):
        query = f"?weight_version={name}" if name else ""
        r = http.post("/update_weights_from_tensor" + query, content=body, headers=OCTET)
        assert r.json()["weight_version"] == str(start + i) and r.json()["weight_version_name"] == name
        assert version(http) == {"weight_version": str(start + i), "weight_version_name": name}
    r = http.post("/update_weights_from_disk", json={"model_path": "same", "weight_version": "step-1"})
    assert r.json()["weight_version"] == str(start + 4) and r.json()["weight_version_name"] == "step-1"
    idle_and_clean(server)


@pytest.fixture(scope="module")
def broken(dirs):
    """Weight folders a client may point at: truncated, a header claiming 2**60 bytes, an index whose weight_map
    is a list, an index that is not JSON."""
    root = dirs / "weights"
    good = (dirs / "model" / "model.safetensors").read_bytes()
    for name, files in {
        "truncated": {"model.safetensors": good[:len(good) // 2]},
        "huge-header": {"model.safetensors": (2**60).to_bytes(8, "little") + b"{}"},
        "list-map": {"model.safetensors.index.json": '{"weight_map": ["model.safetensors"]}'},
        "bad-index": {"model.safetensors.index.json": "{not json"},
    }.items():
        (root / name).mkdir(exist_ok=True)
        for file, data in files.items():
            path = root / name / file
            path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return root


@pytest.mark.parametrize("path, words", [("truncated", "cannot read"), ("huge-header", "cannot read"),
                                         ("list-map", "cannot list"), ("bad-index", "cannot list"),
                                         ("new\x00x", "null byte")])
def test_malformed_weight_folders_answer_400_in_the_envelope(on, broken, path, words):
    server, http = on
    before, v = embed(server), version(http)
    r = http.post("/update_weights_from_disk", json={"model_path": path})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert str(broken) not in r.text
    assert torch.equal(embed(server), before) and version(http) == v
    idle_and_clean(server)


def test_refusals_do_not_echo_resolved_paths(on, dirs):
    server, http = on
    for path in ["../outside", "link", "filelink", str(dirs / "outside")]:
        r = http.post("/update_weights_from_disk", json={"model_path": path})
        assert r.status_code == 403
        message = r.json()["error"]["message"]
        assert str(dirs / "weights") not in message and str(dirs / "outside") not in message.replace(path, "")


def test_typed_query_parameters_and_content_types_of_admin_routes(on):
    server, http = on
    r = http.post("/sleep?level=deep")
    assert r.status_code == 400 and "level" in r.json()["error"]["message"], r.text
    body = save({"model.norm.weight": torch.ones(64)})
    for headers in ({}, {"Content-Type": "application/json"}, {"Content-Type": "text/plain"}):
        r = http.post("/update_weights_from_tensor", content=body, headers=headers)
        assert r.status_code == 415 and "application/octet-stream" in r.json()["error"]["message"], r.text
    r = http.post("/update_weights_from_disk", content=b'{"model_path": "new"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    idle_and_clean(server)
