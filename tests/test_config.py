from pathlib import Path

import pytest

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
    if "paper" in path.parts:
        load_config(path, ["data.train=arithmetic", "data.eval=arithmetic"])  # paper data files are the user's
    else:
        load_config(path)


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
