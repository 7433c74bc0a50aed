"""python -m engine.serve's flags, generated from EngineConfig and ServerConfig (engine/dataclass_args.py): every
field is a flag with its default and its help, bools as --x/--no-x, and every spelling the server had before
still parses to the same settings."""
import argparse
import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from engine.config import EngineConfig
from engine.dataclass_args import add_dataclass_args, dataclass_kwargs, field_docs
from engine.serve.__main__ import configs, parse_args, parser
from engine.serve.config import ServerConfig


@dataclass
class Toy:
    """A toy config."""
    name: str
    """Its name (100% required)."""
    count: int = 3
    """How many."""
    ratio: float | None = None
    """A ratio, or none."""
    on: bool = True
    """A switch."""
    mode: Literal["a", "b"] = "a"
    """One of two."""
    hosts: list[str] | None = None
    """Any number of hosts."""
    tags: list[int] = field(default_factory=lambda: [1, 2])
    undocumented: int = 0


def toy_parser():
    p = argparse.ArgumentParser()
    add_dataclass_args(p, Toy, aliases={"on": ["--switch"], "count": ["-c"]})
    return p


def test_fields_become_flags_of_their_type_with_defaults_and_docstrings():
    p = toy_parser()
    assert Toy(**dataclass_kwargs(Toy, p.parse_args(["--name", "x"]))) == Toy("x")
    args = p.parse_args(["--name", "x", "-c", "5", "--ratio", "0.5", "--no-switch", "--mode", "b",
                         "--hosts", "h1", "h2", "--tags", "7"])
    assert Toy(**dataclass_kwargs(Toy, args)) == Toy("x", 5, 0.5, False, "b", ["h1", "h2"], [7])
    assert p.parse_args(["--name", "x", "--ratio", "none", "--no-on"]).ratio is None
    assert p.parse_args(["--name", "x", "--switch"]).on is True
    for bad in (["--count", "3"], ["--name", "x", "--count", "many"], ["--name", "x", "--mode", "c"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    assert field_docs(Toy) == {"name": "Its name (100% required).", "count": "How many.", "ratio": "A ratio, or none.",
                               "on": "A switch.", "mode": "One of two.", "hosts": "Any number of hosts."}
    text = p.format_help()
    assert "Its name (100% required)." in text and "How many. (default: 3)" in text and "--no-switch" in text


def flags_of(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in p._actions}


@pytest.mark.parametrize("cls", [EngineConfig, ServerConfig])
def test_every_config_field_is_a_flag_with_its_default_and_help(cls):
    actions, docs = flags_of(parser()), field_docs(cls)
    for f in dataclasses.fields(cls):
        action = actions[f.name]
        assert "--" + f.name.replace("_", "-") in action.option_strings
        assert docs.get(f.name) and action.help.startswith(docs[f.name].replace("%", "%%")), f.name
        if f.default is not dataclasses.MISSING and f.name != "api_key":
            assert action.default == f.default, f.name
        if f.type in (bool, "bool"):
            assert "--no-" + f.name.replace("_", "-") in action.option_strings


OLD_ARGV = ["--model", "m", "--served-model-name", "s", "--dtype", "float32", "--device", "cpu", "--host", "0.0.0.0",
            "--port", "9000", "--api-key", "k", "--max-num-seqs", "8", "--max-num-batched-tokens", "512",
            "--max-model-len", "128", "--kv-cache-memory-gb", "0.5", "--block-size", "8", "--no-prefix-caching",
            "--logprobs-mode", "raw_logprobs", "--enable-weight-updates", "--weights-dir", "/w", "--max-body-mb", "2",
            "--max-weights-body-gb", "1", "--reject-unknown-fields", "--log-level", "warning"]


def test_every_spelling_the_server_had_still_parses():
    engine, server = configs(parse_args(OLD_ARGV))
    assert engine == EngineConfig("m", dtype="float32", device="cpu", max_num_seqs=8, max_num_batched_tokens=512,
                                  max_model_len=128, kv_cache_memory_gb=0.5, block_size=8, enable_prefix_caching=False)
    assert server == ServerConfig("s", host="0.0.0.0", port=9000, api_key="k", enable_weight_updates=True,
                                  weights_dir="/w", max_body_mb=2.0, max_weights_body_gb=1.0,
                                  logprobs_mode="raw_logprobs", reject_unknown_fields=True, log_level="warning")


def test_the_flags_the_server_could_not_set_before():
    args = parse_args(["--model", "m", "--attention-backend", "torch", "--gpu-memory-utilization", "0.5",
                       "--no-fused-decode", "--no-batch-invariant", "--max-sequences-per-request", "64",
                       "--max-queued-requests", "10", "--allowed-hosts", "node-1", "10.0.0.2"])
    engine, server = configs(args)
    assert (engine.attention_backend, engine.gpu_memory_utilization, engine.fused_decode, engine.batch_invariant) == \
        ("torch", 0.5, False, False)
    assert (server.max_sequences_per_request, server.max_queued_requests, server.allowed_hosts) == \
        (64, 10, ["node-1", "10.0.0.2"])


def test_api_key_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("ETTRL_API_KEY", "from-env")
    assert parse_args(["--model", "m"]).api_key == "from-env"


def test_help_and_a_refused_setting_say_what_is_wrong():
    run = [sys.executable, "-m", "engine.serve"]
    out = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--gpu-memory-utilization" in out.stdout and "--max-queued-requests" in out.stdout
    out = subprocess.run([*run, "--model", "m", "--block-size", "3"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "block_size must be a positive power of two" in out.stderr


def test_a_tree_request_defaults_to_tree_params_defaults():
    """/v1/sample_tree without tree fields samples the trees LLM.sample_tree samples with TreeParams()."""
    from engine import TreeParams
    from engine.serve.protocol import SampleTreeRequest

    request = SampleTreeRequest(prompts=["x"])
    for f in dataclasses.fields(TreeParams):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert getattr(request, f.name) == default, f.name
