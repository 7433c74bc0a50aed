"""bench/methods.py without training: resume decisions, the commands it launches, and the statistics of its
report on hand-made summaries (checked against values computed by hand)."""
import importlib.util
import json
import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "bench" / "methods.py")
bm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bm)


def write_summary(out: Path, method: str, seed: int, before: float, after: float) -> None:
    path = bm.run_dir(out, method, seed)
    path.mkdir(parents=True, exist_ok=True)
    metrics = lambda v: {"avg@16": v, "maj@16": v + 0.1, "greedy": v - 0.1, "pass@16": 0.9}  # noqa: E731
    (path / "summary.json").write_text(json.dumps({"method": method, "before": metrics(before),
                                                   "after": metrics(after)}))


def test_t_quantiles_match_the_tables():
    for df, expected in ((1, 12.706), (2, 4.303), (7, 2.365), (30, 2.042), (200, 1.972)):
        assert bm.t_quantile(0.975, df) == pytest.approx(expected, abs=2e-3)


def test_report_statistics_by_hand(tmp_path):
    ttrl = [0.50, 0.60, 0.55]
    ettrl = [0.58, 0.61, 0.65]
    for s, (a, b) in enumerate(zip(ttrl, ettrl)):
        write_summary(tmp_path, "ttrl", s, 0.5, a)
        write_summary(tmp_path, "ettrl", s, 0.5, b)
    write_summary(tmp_path, "ettrl", 3, 0.5, 0.9)  # no ttrl partner: counts in its mean, not in the paired difference
    rows = {(r["method"], r["metric"]): r for r in bm.aggregate(bm.load_summaries(tmp_path))}
    base = rows[("ttrl", "avg@16")]
    assert base["n"] == 3 and base["mean"] == pytest.approx(0.55)
    assert base["se"] == pytest.approx(statistics.stdev(ttrl) / math.sqrt(3))
    assert base["change"] == pytest.approx(0.05) and "diff" not in base
    r = rows[("ettrl", "avg@16")]
    assert r["n"] == 4 and r["mean"] == pytest.approx(statistics.fmean(ettrl + [0.9]))
    diffs = [0.08, 0.01, 0.10]
    half = 4.303 * statistics.stdev(diffs) / math.sqrt(3)
    assert r["pairs"] == 3 and r["diff"] == pytest.approx(statistics.fmean(diffs))
    assert (r["low"], r["high"]) == pytest.approx((r["diff"] - half, r["diff"] + half), abs=1e-4)
    assert rows[("ettrl", "maj@16")]["diff"] == pytest.approx(r["diff"])
    assert (base["rose"], base["fell"], base["paired"]) == (2, 0, 3)  # 0.50 -> 0.50 neither rose nor fell
    assert (r["rose"], r["fell"], r["paired"]) == (4, 0, 4)
    table = bm.format_rows(list(rows.values()), markdown=True)
    assert table.splitlines()[0].startswith("| method | metric |") and "+6.3 [" in table and "| 2 / 0 of 3 |" in table


def test_label_accuracy_per_step(tmp_path):
    curves = {("ttrl", 0): [0.5, 1.0], ("ttrl", 1): [0.25, 0.5, 0.75], ("etmr", 0): [0.0]}
    for (method, seed), values in curves.items():
        write_summary(tmp_path, method, seed, 0.5, 0.5)
        rows = [{"type": "optim", "step": k + 1, "loss": 0.0} for k in range(len(values))]
        rows += [{"type": "train", "step": k + 1, "label_acc": v} for k, v in enumerate(values)]
        (bm.run_dir(tmp_path, method, seed) / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    loaded = bm.load_steps(tmp_path)
    assert loaded == {"ttrl": {0: [0.5, 1.0], 1: [0.25, 0.5, 0.75]}, "etmr": {0: [0.0]}}
    table = bm.per_step_table(loaded).splitlines()
    assert table[0] == "| label_acc | seeds | 1 | 2 | 3 | all steps |"
    assert table[2:] == ["| ttrl | 2 | 0.38 | 0.75 | 0.75 | 0.60 |", "| etmr | 1 | 0.00 |  |  | 0.00 |"]


def test_sweep_resumes_where_it_stopped(tmp_path):
    out = tmp_path / "sweep"
    launched = []

    def fake_launch(cmd):
        launched.append(cmd)
        path = Path(cmd[cmd.index("--resume") + 1] if "--resume" in cmd else cmd[cmd.index("--run-dir") + 1])
        method, _, seed = path.name.rpartition("-seed")
        write_summary(out, method, int(seed), 0.5, 0.6)
        return SimpleNamespace(returncode=0)

    bm.check_sweep_file(out, ["trainer.lr=1e-5"], None)
    write_summary(out, "ttrl", 0, 0.5, 0.6)  # done
    ckpt = bm.run_dir(out, "etmr", 0) / "checkpoints" / "step-000010"
    ckpt.mkdir(parents=True)  # stopped after a checkpoint: resume
    killed = bm.run_dir(out, "ettrl", 0)
    killed.mkdir(parents=True)
    (killed / "metrics.jsonl").write_text("{}\n")  # stopped before one: start again
    bm.sweep(out, ["ttrl", "etmr", "ettrl"], 2, ["trainer.lr=1e-5"], launch=fake_launch, log=lambda line: None)

    names = [Path(c[c.index("--resume") + 1] if "--resume" in c else c[c.index("--run-dir") + 1]).name
             for c in launched]
    assert names == ["etmr-seed0", "ettrl-seed0", "ttrl-seed1", "etmr-seed1", "ettrl-seed1"]  # seed-major
    assert "--resume" in launched[0] and "method=etmr" not in launched[0]
    assert launched[1][-4:] == ["method=ettrl", "seed=0", "trainer.lr=1e-5", "eval.before=false"]
    assert launched[2][-3:] == ["method=ttrl", "seed=1", "trainer.lr=1e-5"], "the first method scores the eval before"
    assert not (killed / "metrics.jsonl").exists(), "the killed run started from an empty folder"
    assert all(bm.run_state(bm.run_dir(out, m, s)) == "done" for m, s in bm.planned_runs(["ttrl", "etmr"], 2))

    launched.clear()
    bm.sweep(out, ["ttrl", "etmr", "ettrl"], 2, ["trainer.lr=1e-5"], launch=fake_launch, log=lambda line: None)
    assert launched == [], "a finished sweep launches nothing"
    with pytest.raises(SystemExit, match="Use another --out"):
        bm.sweep(out, ["ttrl"], 2, ["trainer.lr=2e-5"], launch=fake_launch, log=lambda line: None)


def test_a_failed_run_stops_the_sweep(tmp_path):
    with pytest.raises(SystemExit, match="ttrl seed 0 failed"):
        bm.sweep(tmp_path, ["ttrl"], 1, [], launch=lambda cmd: SimpleNamespace(returncode=1), log=lambda line: None)


def test_parallel_sweep_gives_each_run_its_own_threads_and_log(tmp_path, monkeypatch):
    monkeypatch.setattr(bm.os, "cpu_count", lambda: 4)
    calls = []

    def fake_launch(cmd, env=None, log_path=None):
        path = Path(cmd[cmd.index("--run-dir") + 1])
        method, _, seed = path.name.rpartition("-seed")
        calls.append((path.name, env["OMP_NUM_THREADS"], log_path.name))
        write_summary(tmp_path, method, int(seed), 0.5, 0.6)
        return SimpleNamespace(returncode=0)

    bm.sweep(tmp_path, ["ttrl", "etmr"], 2, [], launch=fake_launch, log=lambda line: None, jobs=2)
    assert sorted(calls) == sorted((f"{m}-seed{s}", "2", f"{m}-seed{s}.log") for s in (0, 1) for m in ("ttrl", "etmr"))
    assert all(bm.run_state(bm.run_dir(tmp_path, m, s)) == "done" for m in ("ttrl", "etmr") for s in (0, 1))


def test_after_a_failure_a_parallel_sweep_starts_nothing_new(tmp_path):
    started = []

    def fail(cmd, env=None, log_path=None):
        started.append(cmd)
        return SimpleNamespace(returncode=1)

    with pytest.raises(SystemExit, match="ttrl seed 0 failed"):
        bm.sweep(tmp_path, ["ttrl"], 4, [], launch=fail, log=lambda line: None, jobs=1)
    assert len(started) == 1


def test_a_run_without_the_eval_before_borrows_its_seeds(tmp_path):
    write_summary(tmp_path, "ttrl", 0, 0.4, 0.6)
    write_summary(tmp_path, "etmr", 0, 0.4, 0.5)
    path = bm.run_dir(tmp_path, "etmr", 0) / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "before": None}))
    runs = bm.load_summaries(tmp_path)
    assert runs["etmr"][0]["before"] == runs["ttrl"][0]["before"]
    change = {r["metric"]: r["change"] for r in bm.aggregate(runs) if r["method"] == "etmr"}
    assert change["avg@16"] == pytest.approx(0.1)


def test_per_seed_table(tmp_path):
    for seed, (a, b) in enumerate([(0.5, 0.25), (0.75, 0.5)]):
        write_summary(tmp_path, "ttrl", seed, 0.4, a)
        write_summary(tmp_path, "etmr", seed, 0.4, b)
    for method, tokens in (("ttrl", 100), ("etmr", 60)):
        for seed in (0, 1):
            path = bm.run_dir(tmp_path, method, seed) / "summary.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "rollout_tokens": tokens + seed}))
    table = bm.per_seed_table(bm.load_summaries(tmp_path)).splitlines()
    assert table[0] == "| | seed 0 | seed 1 | mean |"
    assert table[2:] == ["| avg@16 before | 40.0 | 40.0 | 40.0 |", "| ttrl avg@16 | 50.0 | 75.0 | 62.5 |",
                         "| etmr avg@16 | 25.0 | 50.0 | 37.5 |", "| etmr tokens / ttrl | 0.60 | 0.60 | 0.60 |"]


@pytest.mark.parametrize("keep", [False, True])
def test_a_finished_runs_checkpoints_go_unless_kept(tmp_path, keep):
    def fake_launch(cmd):
        path = Path(cmd[cmd.index("--run-dir") + 1])
        (path / "checkpoints" / "step-000016").mkdir(parents=True)
        write_summary(tmp_path, "ttrl", 0, 0.5, 0.6)
        return SimpleNamespace(returncode=0)

    bm.sweep(tmp_path, ["ttrl"], 1, [], launch=fake_launch, log=lambda line: None, keep_checkpoints=keep)
    assert (bm.run_dir(tmp_path, "ttrl", 0) / "checkpoints").exists() == keep
    assert bm.run_state(bm.run_dir(tmp_path, "ttrl", 0)) == "done"
