from pathlib import Path

import pytest
import yaml

from ettrl.config import Config, ConfigError, config_to_dict, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load_config(None, ["method=ettrl", "trainer.lr=1e-6", "rollout.trees=3", "data.train_size=10"])
    assert cfg.method == "ettrl" and cfg.trainer.lr == 1e-6 and cfg.data.train_size == 10
    assert cfg.tree and cfg.n_votes == 3 * (1 + cfg.rollout.forks * cfg.rollout.branches)
    assert cfg.shaping == "res" and load_config(None, ["method=ttrl"]).shaping == "none"


def test_yaml_roundtrip(tmp_path):
    cfg = load_config(None, ["method=ear", "algo.reshape=clip", "trainer.betas=[0.9, 0.95]"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


def test_default_yaml_is_the_dataclass_default():
    """`python -m ettrl.run` without --config runs configs/default.yaml: the two must agree."""
    assert config_to_dict(load_config(ROOT / "configs" / "default.yaml")) == config_to_dict(Config())


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    """Each shipped YAML loads and validates, every key in it takes effect (none ignored or overwritten), and a
    paper config's name, model and data are the ones its file name says."""
    overrides = ["data.train=arithmetic", "data.eval=arithmetic"] if "paper" in path.parts else []
    cfg = load_config(path, overrides)  # paper data files are the user's
    written = _flat(yaml.safe_load(path.read_text()))
    loaded = _flat(config_to_dict(cfg))
    for key, value in written.items():
        if not any(o.startswith(key + "=") for o in overrides):
            assert loaded[key] == value, f"{path.name}: {key} is {value!r} in the file but {loaded[key]!r} loaded"
    assert cfg.name == path.stem
    if "paper" in path.parts:
        model, data = path.stem.removesuffix("-ttrl").rsplit("-", 1)  # -ttrl: the TTRL-baseline variant
        assert model in cfg.model.name.lower() and path.stem.startswith(("qwen2.5-math", "llama-3.1"))
        assert written["data.train"] == f"data/{data}.jsonl" and written["data.eval"] == f"data/{data}.jsonl"
        assert cfg.rollout.n_train <= cfg.n_votes and cfg.trainer.backend == "deepspeed"


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out


@pytest.mark.parametrize("overrides, message", [
    (["method=grpo"], "method='grpo' is unknown; choose one of ttrl"),
    (["rollout.n_train=32", "rollout.n_votes=16"], "rollout.n_train=32 is more than the 16 responses"),
    (["method=ettrl", "rollout.n_train=40"], "lower rollout.n_train"),
    (["data.train=missing.jsonl"], "data file missing.jsonl does not exist"),
    (["trainer.lrr=1"], "did you mean trainer.lr?"),
    (["trainer.lr=fast"], "trainer.lr must be a float"),
    (["rollout.temperature=0"], "rollout.temperature must be > 0"),
    (["trainer.backend=jax"], "use torch or deepspeed"),
    (["noequals"], "must look like key=value"),
])
def test_bad_configs_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


def test_run_command_rejects_bad_config_before_loading_anything(tmp_path):
    from ettrl.run import main

    with pytest.raises(SystemExit, match="lower rollout.n_train"):
        main(["method=ettrl", "rollout.n_train=99", f"output_dir={tmp_path}"])
    assert not any(tmp_path.iterdir()), "nothing is written for a config that cannot run"


# ---- the engine section: every EngineConfig field, the trainer's own defaults --------------------------------------
def test_engine_section_holds_every_engine_config_field():
    """Same names, types and defaults as engine.config.EngineConfig (but model, which is model.name), except the
    trainer's defaults: dtype auto (bfloat16 on CUDA, float32 on the CPU) and gpu_memory_utilization 0.4."""
    import dataclasses
    import typing

    from engine.config import EngineConfig
    from ettrl.config import EngineSection
    engine = {f.name: f for f in dataclasses.fields(EngineConfig) if f.name != "model"}
    section = {f.name: f for f in dataclasses.fields(EngineSection)}
    assert list(section) == list(engine), "add the new EngineConfig field to ettrl/config.py's EngineSection"
    engine_types, section_types = typing.get_type_hints(EngineConfig), typing.get_type_hints(EngineSection)
    assert all(section_types[name] == engine_types[name] for name in engine)
    differ = {name: (section[name].default, f.default) for name, f in engine.items()
              if section[name].default != f.default}
    assert differ == {"dtype": ("auto", "bfloat16"), "gpu_memory_utilization": (0.4, 0.9)}


def test_engine_keys_reach_llm_with_the_trainers_defaults(monkeypatch):
    from engine.config import EngineConfig
    from ettrl.rollout import engine_options
    cfg = load_config(None, ["engine.num_kv_blocks=64", "engine.kv_cache_memory_gb=null", "engine.max_model_len=",
                             "engine.attention_backend=torch", "engine.fused_decode=false"])
    options = engine_options(cfg.engine, "cpu")
    assert options["dtype"] == "float32" and options["device"] == "cpu" and options["gpu_memory_utilization"] == 0.4
    assert options["num_kv_blocks"] == 64 and options["kv_cache_memory_gb"] is None and options["max_model_len"] is None
    assert options["attention_backend"] == "torch" and options["fused_decode"] is False
    assert EngineConfig(model="m", **options).num_kv_blocks == 64  # every key is an EngineConfig argument
    assert engine_options(cfg.engine, "cuda")["dtype"] == "bfloat16"
    assert engine_options(cfg.engine, "cuda:1")[("dtype")] == "bfloat16"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert engine_options(cfg.engine, "auto")["device"] == "cuda"
    assert engine_options(cfg.engine, "auto")["dtype"] == "bfloat16"
    own = load_config(None, ["engine.dtype=float16", "engine.device=cuda:1", "device=cpu"])
    assert (engine_options(own.engine, own.device)["dtype"], engine_options(own.engine, own.device)["device"]) == \
        ("float16", "cuda:1")


@pytest.mark.parametrize("overrides, message", [
    (["model.engine_dtype=bfloat16"], "model.engine_dtype is now engine.dtype"),
    (["model.gpu_memory_utilization=0.3"], "model.gpu_memory_utilization is now engine.gpu_memory_utilization"),
    (["engine.gpu_memory_utilization=1.5"], "engine.gpu_memory_utilization must be in (0, 1]"),
    (["engine.dtype=float64"], "engine.dtype must be one of"),
    (["engine.attention_backend=flash"], "engine.attention_backend must be one of"),
    (["engine.block_size=12"], "engine.block_size must be a positive power of two"),
    (["engine.num_kv_blocks=many"], "engine.num_kv_blocks must be a int"),
    (["engine.max_num_seq=4"], "did you mean engine.max_num_seqs?"),
])
def test_bad_engine_keys_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_moved_keys_in_a_yaml_file_name_the_new_ones(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  name: x\n  engine_dtype: bfloat16\n")
    with pytest.raises(ConfigError, match="model.engine_dtype is now engine.dtype"):
        load_config(path)
