"""Checkpoints: HF-loadable safetensors weights plus optimizer, scheduler, RNG and loop state.

A checkpoint directory `checkpoints/step-NNNNNN/` is written under a temporary name and renamed into
place, so a run killed mid-save never leaves a half-written checkpoint that `--resume` would pick up.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

STATE_FILE = "trainer_state.pt"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    weights: dict[str, torch.Tensor] | None, backend_state: dict, loop_state: dict, rank: int = 0,
                    barrier: Callable[[], None] = lambda: None, keep: int = 2) -> Path:
    """Every rank writes its optimizer/scheduler/RNG state; rank 0 writes the weights and renames into place."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    if not tmp.is_dir():
        raise RuntimeError(f"rank {rank} cannot see {tmp}, which rank 0 has just created: a run on several nodes "
                           f"needs its run directory on a filesystem every node shares (each rank saves its own "
                           f"optimizer state into the checkpoint)")
    torch.save({"backend": backend_state, "rng": rng_state()}, tmp / f"rank{rank}.pt")
    barrier()
    if rank == 0:
        model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save({"loop": loop_state}, tmp / STATE_FILE)
        (tmp / "loop_state.json").write_text(json.dumps(loop_state, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        _prune(final.parent, keep)
    barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load_training_state(ckpt: Path, rank: int = 0) -> dict:
    """{"loop", "backend", "rng"} for this rank."""
    ckpt = Path(ckpt)
    mine = ckpt / f"rank{rank}.pt"
    if not mine.is_file():
        raise FileNotFoundError(f"{ckpt} has no state for rank {rank}; "
                                "resume with the number of processes that saved it")
    return {**torch.load(ckpt / STATE_FILE, weights_only=False), **torch.load(mine, weights_only=False)}


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
