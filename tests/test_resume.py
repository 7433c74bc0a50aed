"""Kill a training run at a random step, resume it, and get exactly the run that was never interrupted."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_tiny_task  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    make_tiny_task(root)
    config = {
        "name": "tiny", "method": "ttrl", "save_every": 1,
        "model": {"name": str(root / "model")},
        "data": {"train": str(root / "problems.jsonl"), "eval": "", "prompt": "plain"},
        "rollout": {"n_votes": 6, "n_train": 4, "max_tokens": 24, "temperature": 1.0, "last_number_fallback": True},
        "trainer": {"prompts_per_step": 2, "micro_batch_size": 3, "max_steps": STEPS, "lr": 1e-4, "warmup_ratio": 0.3},
    }
    import yaml

    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    return root


def run_cmd(*args):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "ettrl.run", *args], env


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows if r["type"] == "train"]


def final_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors")


def test_killed_run_resumes_exactly(setup, tmp_path):
    cmd, env = run_cmd("--config", str(setup / "tiny.yaml"), "--run-dir", str(tmp_path / "full"))
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)

    kill_after = random.randint(1, STEPS - 1)  # conftest seeds `random` per test and prints the seed on failure
    killed = tmp_path / "killed"
    cmd, env = run_cmd("--config", str(setup / "tiny.yaml"), "--run-dir", str(killed))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / f"step-{kill_after:06d}" / "trainer_state.pt"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run should have reached the checkpoint before it was killed"

    cmd, env = run_cmd("--resume", str(killed))
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=600)
    assert "resumed from" in out.stdout

    full, resumed = train_rows(tmp_path / "full"), train_rows(killed)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert resumed == full, f"killed after step {kill_after}: the resumed steps must equal the uninterrupted run's"
    a, b = final_weights(tmp_path / "full"), final_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_says_so(setup, tmp_path):
    from ettrl.run import main

    (tmp_path / "config.yaml").write_text((setup / "tiny.yaml").read_text())
    with pytest.raises(SystemExit, match="no finished checkpoint"):
        main(["--resume", str(tmp_path)])
