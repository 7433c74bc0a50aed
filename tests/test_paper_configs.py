"""The paper configs are TTRL's algorithm: dry runs (no model download) of config, step count and batches."""
import json
from pathlib import Path

import pytest

from ettrl.config import config_to_dict, load_config
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
    baseline = path.stem.endswith("-ttrl")  # the TTRL-baseline variant of a Qwen2.5-Math recipe
    task = path.stem.removesuffix("-ttrl").rsplit("-", 1)[1]
    data = fake_task(tmp_path, task)
    cfg = load_config(path, [f"data.train={data}", f"data.eval={data}"])
    t, r = cfg.trainer, cfg.rollout
    assert (t.mini_batch_prompts, t.ppo_epochs, t.kl_coef, t.clip_ratio_c, t.drop_last) == (1, 1, 0.001, 3.0, True)
    assert (cfg.algo.std, r.n_votes, r.n_train, r.stop_at_answer) == ("bessel", 64, 32, False)  # TTRL: no stop
    assert (r.train_pick, r.vote) == (("first", "ttrl") if baseline else ("stratified", "boxed"))
    assert (r.fork_metric, r.temperature) == (("entropy", 1.0) if baseline else ("surprisal", 0.6))
    assert (t.lr, t.warmup_ratio, t.weight_decay, t.grad_clip, t.eps_low, t.eps_high, t.loss_agg) == (
        5e-7, 0.03, 0.01, 1.0, 0.2, 0.2, "token-mean")
    assert t.prompts_per_step == 8 and t.epochs == EPOCHS[task]
    # verl: len(dataloader with drop_last) x total_epochs; 8 optimizer steps (1 prompt x 32) per rollout batch
    assert step_count(t, SIZES[task]) == EPOCHS[task] * (SIZES[task] // 8)
    assert mini_batches_per_step(t) == 8
    for method in ("ttrl", "ear") if baseline else ("ttrl", "etmr", "ear", "ettrl"):
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
    (["rollout.train_pick=last"], "use random, first or stratified"),
    (["rollout.vote=strings"], "use boxed or ttrl"),
    (["rollout.vote=ttrl", "rollout.last_number_fallback=true"], "drop rollout.last_number_fallback"),
    (["rollout.vote=ttrl", "method=dare"], "use rollout.vote=boxed"),
    (["rollout.min_gap=0"], "rollout.min_gap=0"),
    (["rollout.no_fork_after=['']"], "non-empty strings"),
    (["rollout.no_fork_after=x"], "rollout.no_fork_after must be a list"),
])
def test_new_options_are_validated(overrides, message):
    from ettrl.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_ttrl_baselines_differ_from_their_recipe_only_where_ttrl_did(tmp_path):
    """Each TTRL-baseline file is its Qwen2.5-Math paper recipe with TTRL's rollout temperature 1.0, TTRL's vote,
    its pick of the first 32, the tree keys left out (method=ttrl), and evaluated on avg@16 at T=0.6, top-p 0.95."""
    baselines = [p for p in PAPER if p.stem.endswith("-ttrl")]
    assert sorted(p.stem for p in baselines) == [f"qwen2.5-math-1.5b-{t}-ttrl" for t in ("aime2024", "amc", "math500")]
    for path in baselines:
        data = fake_task(tmp_path, path.stem.removesuffix("-ttrl").rsplit("-", 1)[1])
        overrides = [f"data.train={data}", f"data.eval={data}"]
        base = _flat(config_to_dict(load_config(path, overrides)))
        recipe_path = path.with_name(path.stem.removesuffix("-ttrl") + ".yaml")
        recipe = _flat(config_to_dict(load_config(recipe_path, overrides)))
        changed = {k for k in base if base[k] != recipe[k]}
        assert changed == {"name", "rollout.temperature", "rollout.vote", "rollout.train_pick",
                           "rollout.fork_metric", "rollout.trees"}  # the last two: tree keys left to the default
        assert (base["method"], base["rollout.temperature"], base["rollout.vote"]) == ("ttrl", 1.0, "ttrl")
        assert (base["eval.k"], base["eval.temperature"], base["eval.top_p"]) == (16, 0.6, 0.95)


def test_paper_pick_is_ttrls_for_parallel_and_covers_every_tree_for_trees(tmp_path):
    """train_pick=stratified in the paper configs: method=ttrl trains the first 32 of its 64 votes (TTRL's pick);
    method=etmr's 60 leaves (12 trees of 5, ordered by root) give every tree 2 or 3 of the 32."""
    from ettrl.scoring import train_indices

    data = fake_task(tmp_path, "amc")
    path = ROOT / "configs" / "paper" / "qwen2.5-math-1.5b-amc.yaml"
    r = load_config(path, [f"data.train={data}", f"data.eval={data}"]).rollout
    assert train_indices(64, r.n_train, r.train_pick, seed=5) == list(range(32))
    trees = [i // 5 for i in range(60)]
    picks = train_indices(60, r.n_train, r.train_pick, seed=5, trees=trees)
    per_tree = [sum(trees[i] == t for i in picks) for t in range(12)]
    assert len(picks) == 32 and per_tree == [3] * 8 + [2] * 4
    assert train_indices(60, r.n_train, "first", seed=5) == list(range(32))  # first: trees 0-5 and 2 of tree 6


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out
