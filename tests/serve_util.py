"""Runs an engine.serve app with uvicorn in a thread on 127.0.0.1 and a free port; always shut down."""
import contextlib
import socket
import threading
import time

import uvicorn


@contextlib.contextmanager
def running(app, timeout: float = 30.0):
    """Yields the base URL (http://127.0.0.1:PORT) while the server runs; stops it and joins the thread after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
        assert not thread.is_alive(), "the test server did not stop"


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def make_chat_model(path, kind: str = "llama", seed: int = 0):
    """A tiny random model with the byte tokenizer and a plain chat template; returns the transformers model."""
    import json

    from tiny_models import make_tiny_model
    hf = make_tiny_model(kind, path, tokenizer=True, seed=seed)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return hf


def idle_and_clean(server):
    """On the engine loop, once idle: no live sequence, integrity holds, every block free or cached."""
    def check():
        engine = server.engine
        engine.check_integrity()
        assert not engine.live_sequences() and not engine.has_unfinished()
        kv = engine.kv
        assert kv.allocator.num_free + kv.tree.num_cached_blocks == kv.num_blocks
    server.loop.barrier(check).result(timeout=60)


def slow_steps(server, monkeypatch, seconds: float = 0.005):
    """Every engine step sleeps first, so that requests stay in flight long enough to overlap."""
    import time
    step = server.engine.step
    monkeypatch.setattr(server.engine, "step", lambda: (time.sleep(seconds), step())[1])
