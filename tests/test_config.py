from pathlib import Path

import pytest
import yaml

from ettrl.config import Config, ConfigError, config_to_dict, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load_config(None, ["method=ettrl", "trainer.lr=1e-6", "rollout.trees=3", "data.train_size=10"])
    assert cfg.method == "ettrl" and cfg.trainer.lr == 1e-6 and cfg.data.train_size == 10
    assert cfg.tree and cfg.n_votes == 3 * (1 + cfg.rollout.forks * cfg.rollout.branches)
    assert cfg.reshape == "res" and load_config(None, ["method=ttrl"]).reshape == "none"


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
