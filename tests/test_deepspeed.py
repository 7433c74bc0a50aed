"""DeepSpeed ZeRO-1, 2 and 3 on 2 gloo processes (CPU) apply the same update as the plain torch backend."""
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_tiny_policy, make_tiny_task  # noqa: E402

pytest.importorskip("deepspeed")

from ettrl.config import TrainerConfig  # noqa: E402
from ettrl.samples import TrainSample  # noqa: E402
from ettrl.update import policy_update  # noqa: E402

TCFG = dict(lr=1e-3, micro_batch_size=2, warmup_ratio=0.0, grad_clip=0.5, zero_stage=2, prompts_per_step=2)


def make_samples(n: int = 8) -> list[TrainSample]:
    """Four responses a prompt: each micro-batch (of either backend) shares its prompt (trainer.share_prompt)."""
    rng = random.Random(0)
    samples = []
    for i in range(n):
        if i % 4 == 0:
            prompt = [rng.randrange(256) for _ in range(rng.randint(3, 9))]
        response = [rng.randrange(256) for _ in range(rng.randint(1, 12))]
        samples.append(TrainSample(prompt, response, [rng.uniform(-2, 2)] * len(response)))
    return samples


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model_dir: str, out: str, stage: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from ettrl.backends.deepspeed_backend import DeepSpeedBackend
    from ettrl.policy import load_policy

    model, _ = load_policy(model_dir)
    tcfg = TrainerConfig(backend="deepspeed", **{**TCFG, "zero_stage": stage})
    mine = make_samples()[rank::world]
    backend = DeepSpeedBackend(model, tcfg, total_steps=4, micro_batches_per_step=2)
    for _ in range(2):
        metrics = policy_update(backend, mine, tcfg, 1.0, 0)
    weights = {k: v.clone() for k, v in backend.full_state_dict().items()}
    if rank == 0:
        torch.save({"weights": weights, "metrics": metrics}, out)
    backend.barrier()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_matches_plain_torch(tmp_path, stage):
    from ettrl.backends.torch_backend import TorchBackend
    from ettrl.policy import load_policy

    model_dir = make_tiny_policy(tmp_path / "model")
    out = tmp_path / "ds.pt"
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), str(model_dir), str(out), stage), nprocs=2, join=True)
    ds = torch.load(out)

    model, _ = load_policy(model_dir)
    tcfg = TrainerConfig(**TCFG)
    backend = TorchBackend(model, tcfg, total_steps=4)
    for _ in range(2):
        metrics = policy_update(backend, make_samples(), tcfg, 1.0, 0)
    moved = 0.0
    for name, p in model.named_parameters():
        torch.testing.assert_close(ds["weights"][name], p.detach(), atol=2e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
        moved = max(moved, (p.detach() - load_policy(model_dir)[0].state_dict()[name]).abs().max().item())
    assert moved > 1e-4, "the update must move the weights for the comparison to mean anything"
    assert abs(ds["metrics"]["grad_norm"] - metrics["grad_norm"]) < 1e-3 * metrics["grad_norm"]


def torchrun_ettrl(tmp_path, config: dict):
    """Runs `ettrl.run` with `config` on 2 gloo processes under torchrun; returns its output and metrics rows."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "ettrl.run", "--config", str(tmp_path / "c.yaml"),
           "--run-dir", str(tmp_path / "run")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out, [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_launches_two_gloo_trainers(tmp_path):
    """The real command under the standard launcher: two CPU ranks, each with its own engine, ZeRO-2 over gloo."""
    make_tiny_task(tmp_path, num_problems=4, data_file="p.jsonl")
    config = {"name": "tiny", "save_every": 2, "model": {"name": str(tmp_path / "model")},
              "data": {"train": str(tmp_path / "p.jsonl"), "eval": "", "prompt": "plain"},
              "rollout": {"n_votes": 6, "n_train": 4, "max_tokens": 16, "temperature": 1.0,
                          "last_number_fallback": True},
              "trainer": {"backend": "deepspeed", "zero_stage": 2, "prompts_per_step": 2, "micro_batch_size": 2,
                          "max_steps": 2}}
    out, rows = torchrun_ettrl(tmp_path, config)
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2]  # one record per step, from rank 0
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "rank1.pt").exists()
    assert out.stdout.count("step    1/2") == 1


def short_tree_shares() -> tuple[list[TrainSample], list[TrainSample]]:
    """Rank 0's prompt gave 2 responses where 4 train (trees that could not fork): 2 real + 2 zero-weight fillers;
    rank 1's prompt gave its 4. Two mini-batches a rank (one prompt each): rank 0's second is all filler."""
    from ettrl.samples import pad_samples

    samples = make_samples(8)
    return pad_samples(samples[:2], 4), samples[4:]


def _short_tree_worker(rank: int, world: int, port: int, model_dir: str, out: str, stage: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from ettrl.backends.deepspeed_backend import DeepSpeedBackend
    from ettrl.policy import load_policy

    model, _ = load_policy(model_dir)
    tcfg = TrainerConfig(backend="deepspeed", **{**TCFG, "zero_stage": stage, "mini_batch_prompts": 1})
    backend = DeepSpeedBackend(model, tcfg, total_steps=4, micro_batches_per_step=1)
    metrics = policy_update(backend, short_tree_shares()[rank], tcfg, 1.0, 0, mini_batches=2)
    weights = {k: v.clone() for k, v in backend.full_state_dict().items()}
    if rank == 0:
        torch.save({"weights": weights, "metrics": metrics}, out)
    backend.barrier()


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_short_tree_padding_matches_plain_torch(tmp_path, stage):
    """Padding keeps every rank's micro-batch count fixed under ZeRO-2 (and 3, where the old log-probs' no-grad
    forward gathers the partitioned weights) and changes nothing: the same two optimizer steps as the plain
    backend on the global mini-batches."""
    from ettrl.backends.torch_backend import TorchBackend
    from ettrl.policy import load_policy

    model_dir = make_tiny_policy(tmp_path / "model")
    out = tmp_path / "ds.pt"
    torch.multiprocessing.spawn(_short_tree_worker, args=(2, free_port(), str(model_dir), str(out), stage), nprocs=2,
                                join=True)
    ds = torch.load(out)

    model, _ = load_policy(model_dir)
    tcfg = TrainerConfig(**{**TCFG, "mini_batch_prompts": 1})
    r0, r1 = short_tree_shares()
    metrics = policy_update(TorchBackend(model, tcfg, total_steps=4), r0[:2] + r1[:2] + r0[2:] + r1[2:], tcfg, 1.0,
                            0, mini_batches=2)
    assert ds["metrics"]["optimizer_steps"] == metrics["optimizer_steps"] == 2
    for name, p in model.named_parameters():
        torch.testing.assert_close(ds["weights"][name], p.detach(), atol=2e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for a, b in zip(ds["metrics"]["inner"], metrics["inner"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


def test_torchrun_trains_trees_that_cannot_fork(tmp_path):
    """etmr with one-token responses (no fork position): 2 leaves a prompt where 4 train, padded; one step with
    TTRL's update (a mini-batch per prompt, KL to the reference) under ZeRO-2 on two gloo ranks."""
    make_tiny_task(tmp_path, num_problems=4, data_file="p.jsonl")
    config = {"name": "tiny", "method": "etmr", "save_every": 0, "model": {"name": str(tmp_path / "model")},
              "data": {"train": str(tmp_path / "p.jsonl"), "eval": "", "prompt": "plain"},
              "rollout": {"n_train": 4, "max_tokens": 1, "temperature": 1.0, "trees": 2, "forks": 1, "branches": 2},
              "trainer": {"backend": "deepspeed", "zero_stage": 2, "prompts_per_step": 2, "micro_batch_size": 2,
                          "max_steps": 1, "mini_batch_prompts": 1, "kl_coef": 0.001}}
    out, rows = torchrun_ettrl(tmp_path, config)
    train = [r for r in rows if r["type"] == "train"]
    assert [r["step"] for r in train] == [1] and train[0]["optimizer_steps"] == 2
    assert [r["optim_step"] for r in rows if r["type"] == "optim"] == [1, 2]
    assert train[0]["rollout_tokens"] == 2 * 2, "two one-token roots a prompt, no branch"
