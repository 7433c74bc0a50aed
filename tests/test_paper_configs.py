"""The paper configs are TTRL's algorithm: dry runs (no model download) of config, step count and batches."""
import json
from pathlib import Path

import pytest

from ettrl.config import load_config
from ettrl.steps import mini_batches_per_step, step_count, step_prompts

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
SIZES = {"aime2024": 30, "amc": 83, "math500": 500}  # problems in each unlabeled test set
EPOCHS = {"aime2024": 80, "amc": 30, "math500": 10}  # TTRL's EPISODE per task


def fake_task(tmp_path: Path, task: str) -> Path:
    path = tmp_path / f"{task}.jsonl"
    path.write_text("\n".join(json.dumps({"problem": f"p{i}", "answer": str(i)}) for i in range(SIZES[task])))
    return path


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_is_ttrls_update(tmp_path, path):
    task = path.stem.rsplit("-", 1)[1]
    data = fake_task(tmp_path, task)
    cfg = load_config(path, [f"data.train={data}", f"data.eval={data}"])
    t, r = cfg.trainer, cfg.rollout
    assert (t.mini_batch_prompts, t.ppo_epochs, t.kl_coef, t.clip_ratio_c, t.drop_last) == (1, 1, 0.001, 3.0, True)
    assert (cfg.algo.std, r.train_pick, r.n_votes, r.n_train) == ("bessel", "first", 64, 32)
    assert (t.lr, t.warmup_ratio, t.weight_decay, t.grad_clip, t.eps_low, t.eps_high, t.loss_agg) == (
        5e-7, 0.03, 0.01, 1.0, 0.2, 0.2, "token-mean")
    assert t.prompts_per_step == 8 and t.epochs == EPOCHS[task]
    # verl: len(dataloader with drop_last) x total_epochs; 8 optimizer steps (1 prompt x 32) per rollout batch
    assert step_count(t, SIZES[task]) == EPOCHS[task] * (SIZES[task] // 8)
    assert mini_batches_per_step(t) == 8
    for method in ("ttrl", "etmr", "ear", "ettrl"):
        assert load_config(path, [f"data.train={data}", f"data.eval={data}", f"method={method}"]).n_votes >= r.n_train


def test_drop_last_steps_stay_inside_their_epoch():
    cfg = load_config(None, ["trainer.drop_last=true", "trainer.prompts_per_step=8", "trainer.epochs=3"])
    n = 30
    assert step_count(cfg.trainer, n) == 3 * 3
    for epoch in range(3):
        seen = [i for s in range(3 * epoch, 3 * epoch + 3) for i in step_prompts(s, n, cfg.trainer, seed=0)]
        assert len(seen) == len(set(seen)) == 24, "one epoch: 3 whole batches of distinct prompts, 6 dropped"
    assert step_prompts(0, n, cfg.trainer, 0) != step_prompts(3, n, cfg.trainer, 0), "each epoch reshuffles"


def test_default_step_count_is_unchanged():
    cfg = load_config(None, [])
    assert step_count(cfg.trainer, 64) == 16 and mini_batches_per_step(cfg.trainer) == 1
    assert step_count(load_config(None, ["trainer.epochs=3", "trainer.prompts_per_step=8"]).trainer, 30) == 12
    assert step_count(load_config(None, ["trainer.max_steps=5"]).trainer, 30) == 5
    # without drop_last a step may span two epochs; every prompt of an epoch is used once
    t = load_config(None, ["trainer.prompts_per_step=8"]).trainer
    first_epoch = [i for s in range(4) for i in step_prompts(s, 30, t, 0)][:30]
    assert sorted(first_epoch) == list(range(30))


def test_drop_last_needs_a_whole_batch():
    t = load_config(None, ["trainer.drop_last=true", "trainer.prompts_per_step=8"]).trainer
    with pytest.raises(ValueError, match="leaves no step"):
        step_count(t, 5)


@pytest.mark.parametrize("overrides, message", [
    (["trainer.mini_batch_prompts=3"], "must divide trainer.prompts_per_step=4"),
    (["trainer.mini_batch_prompts=8"], "must divide"),
    (["trainer.ppo_epochs=0"], "ppo_epochs must be >= 1"),
    (["trainer.clip_ratio_c=0.5"], "clip_ratio_c must be 0 (off) or > 1"),
    (["algo.std=sample"], "use population or bessel"),
    (["rollout.train_pick=last"], "use random or first"),
])
def test_new_options_are_validated(overrides, message):
    from ettrl.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
