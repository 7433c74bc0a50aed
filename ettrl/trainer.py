"""The test-time RL loop: roll out, grade, vote, reward, pick n_train, advantages, GRPO update, sync the engine.

One `Trainer` per process.  With the DeepSpeed backend every rank runs its own engine on its own device and
rolls out its share of the step's prompts; gradients meet in the backend.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ettrl.backends import make_backend
from ettrl.checkpoint import latest_checkpoint, load_training_state, save_checkpoint, set_rng_state
from ettrl.config import Config, ConfigError
from ettrl.data import load_problems
from ettrl.eval import evaluate
from ettrl.policy import load_policy
from ettrl.prompts import encode_prompts, fewshot_examples, stop_strings
from ettrl.rollout import engine_options, resolve_device, rollout
from ettrl.scoring import score_group
from ettrl.steps import mini_batches_per_step, mix_seed, step_count, step_prompts
from ettrl.update import policy_update

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from engine import LLM
    from ettrl.samples import TrainSample

SHOWN = [("reward", "reward {:.3f}"), ("majority_ratio", "maj {:.2f}"), ("label_acc", "label_acc {:.2f}"),
         ("rollout_acc", "acc {:.2f}"), ("entropy", "H {:.3f}"), ("loss", "loss {:+.4f}"), ("grad_norm", "|g| {:.3f}"),
         ("clip_frac", "clip {:.3f}"), ("kl_ref", "kl {:.4f}"),
         ("rollout_tokens", "tok {:.0f}"), ("rollout_s", "roll {:.1f}s"), ("update_s", "upd {:.1f}s")]


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, log: Callable[..., None] = print) -> None:
        from engine.model_files import resolve_model

        self.cfg, self.run_dir, self.log = cfg, Path(run_dir), log
        torch.manual_seed(cfg.seed)
        d = cfg.data
        self.train_problems = load_problems(d.train, split=d.train_split, problem_field=d.problem_field,
                                            answer_field=d.answer_field, size=d.train_size,
                                            difficulty=d.difficulty, seed=d.seed, key="data.train")
        self.eval_problems = [] if not d.eval else load_problems(
            d.eval, split=d.eval_split, problem_field=d.problem_field, answer_field=d.answer_field,
            size=d.eval_size, difficulty=d.difficulty, seed=d.seed, key="data.eval")
        self.model_dir = resolve_model(cfg.model.name)
        self.device = resolve_device(cfg.device)
        self.model, self.tokenizer = load_policy(self.model_dir, cfg.model.dtype, self.device,
                                                 cfg.model.gradient_checkpointing)
        ckpt = self._latest_checkpoint() if resume else None
        if ckpt is not None:  # weights go in before the backend wraps (and under ZeRO-3 partitions) the model
            self._load_weights(ckpt)
        self.ref_model: PreTrainedModel | None = None
        if cfg.trainer.kl_coef > 0:
            self.ref_model = load_policy(self.model_dir, cfg.model.dtype, self.device)[0].eval().requires_grad_(False)
        t = cfg.trainer
        try:
            self.total_steps = step_count(t, len(self.train_problems))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.mini_batches = mini_batches_per_step(t)
        self.backend = make_backend(self.model, t, self.total_steps, self._micro_batches_per_rank())
        self.rank, self.world = self.backend.rank, self.backend.world_size
        if t.prompts_per_step % self.world:
            raise ConfigError(f"trainer.prompts_per_step={t.prompts_per_step} must be a multiple of the "
                              f"{self.world} processes")
        if (t.prompts_per_step // self.world * cfg.rollout.n_train) % self.mini_batches:
            raise ConfigError(f"each of the {self.world} processes trains {t.prompts_per_step // self.world} prompts x "
                              f"rollout.n_train={cfg.rollout.n_train} samples a step, which do not split into "
                              f"{self.mini_batches} equal mini-batches (prompts_per_step / mini_batch_prompts)")
        self.stop = stop_strings(d.prompt)
        self.train_ids = encode_prompts(self.tokenizer, self.train_problems, d.prompt,
                                        fewshot_examples(d.train, d.difficulty))
        self.eval_ids = encode_prompts(self.tokenizer, self.eval_problems, d.prompt,
                                       fewshot_examples(d.eval, d.difficulty))
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)  # padding is masked anyway
        self.step, self.rollout_tokens, self.wall_s = 0, 0, 0.0
        self.eval_before: dict[str, float] | None = None
        if ckpt is not None:
            self._restore(ckpt)
        self.llm = self._make_engine()

    # -- setup ---------------------------------------------------------------------------------------------

    def _micro_batches_per_rank(self) -> int:
        t = self.cfg.trainer
        world = int(os.environ.get("WORLD_SIZE", "1")) if t.backend == "deepspeed" else 1
        seqs = t.prompts_per_step * self.cfg.rollout.n_train // world // mini_batches_per_step(t)
        return max(1, math.ceil(seqs / t.micro_batch_size))

    def _make_engine(self) -> LLM:
        from engine import LLM

        llm = LLM(str(self.model_dir), **engine_options(self.cfg.engine, self.device))
        self.sleep_engine = torch.device(self.device).type == "cuda"  # on the CPU the pool's memory stays
        if self.step > 0:
            llm.update_weights(self.backend.full_state_dict().items())
        return llm

    def _latest_checkpoint(self) -> Path:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"--resume {self.run_dir}: no finished checkpoint under "
                                    f"{self.run_dir / 'checkpoints'}")
        return ckpt

    def _load_weights(self, ckpt: Path) -> None:
        from safetensors.torch import load_file

        weights = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            weights.update(load_file(f))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
            raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {missing}, "
                               f"unexpected {unexpected}")

    def _restore(self, ckpt: Path) -> None:
        state = load_training_state(ckpt, self.rank)
        self.backend.load_state_dict(state["backend"])
        set_rng_state(state["rng"])
        loop = state["loop"]
        self.step, self.rollout_tokens, self.wall_s = loop["step"], loop["rollout_tokens"], loop["wall_s"]
        self.eval_before = loop.get("eval_before")
        if self.rank == 0:
            _truncate_jsonl(self.run_dir / "metrics.jsonl", self.step)
        self.log(f"resumed from {ckpt} at step {self.step}/{self.total_steps}")

    # -- the loop --------------------------------------------------------------------------------------------

    def batch_indices(self, step: int) -> list[int]:
        """Prompts of a step: epoch-wise seeded shuffles, a pure function of the step (so resume is exact)."""
        return step_prompts(step, len(self.train_problems), self.cfg.trainer, self.cfg.seed)

    def collect(self, step: int) -> tuple[list[TrainSample], list[dict[str, float]], float]:
        """Roll out this rank's prompts of `step` and score them: (training samples, per-prompt metrics, seconds)."""
        cfg = self.cfg
        mine = self.batch_indices(step)[self.rank :: self.world]
        t0 = time.perf_counter()
        groups = rollout(self.llm, [self.train_problems[i] for i in mine], [self.train_ids[i] for i in mine], cfg,
                         self.stop, mix_seed(cfg.seed, step, 1), progress=self.rank == 0)
        rollout_s = time.perf_counter() - t0
        samples: list[TrainSample] = []
        per_prompt: list[dict[str, float]] = []
        for i, g in zip(mine, groups):
            s, m = score_group(g, cfg, mix_seed(cfg.seed, step, i, 2))
            samples += s
            per_prompt.append({**m, "rollout_tokens": g.decoded_tokens})
        return samples, per_prompt, rollout_s

    def update(self, samples: list[TrainSample]) -> dict[str, Any]:
        """The optimizer steps of the rollout batch (one per mini-batch and PPO epoch), then the engine gets the
        new weights. "inner" holds each optimizer step's metrics."""
        cfg = self.cfg
        if self.sleep_engine:  # the KV pool's memory serves the update (sleep mode)
            self.llm.sleep()
        try:
            metrics = policy_update(self.backend, samples, cfg.trainer, cfg.rollout.temperature, self.pad_id,
                                    self.ref_model, progress=self.rank == 0, mini_batches=self.mini_batches)
            self.llm.update_weights(self.backend.full_state_dict().items())
        except BaseException as error:  # the update's error is the one to see, not a failed wake-up after it
            if self.sleep_engine:
                try:
                    self.llm.wake_up()
                except Exception as wake_error:  # noqa: BLE001 - reported on the update's error
                    error.add_note(f"and the engine could not wake up after it: {type(wake_error).__name__}: "
                                   f"{wake_error}")
            raise
        if self.sleep_engine:
            self.llm.wake_up()
        return metrics

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        samples, per_prompt, rollout_s = self.collect(self.step)
        t1 = time.perf_counter()
        upd = self.update(samples)
        t2 = time.perf_counter()
        record = self._reduce(per_prompt)
        record["rollout_tokens"] *= len(per_prompt) * self.world  # a sum over the step, not a mean per prompt
        self.rollout_tokens += int(round(record["rollout_tokens"]))
        self.step += 1
        return {"step": self.step, **record, **upd, "rollout_tokens_total": self.rollout_tokens,
                "rollout_s": rollout_s, "score_s": t1 - t0 - rollout_s, "update_s": t2 - t1}

    def _reduce(self, rows: list[dict[str, float]]) -> dict[str, float]:
        keys = sorted(rows[0])
        sums = self.backend.all_reduce_sum([sum(r[k] for r in rows) for k in keys] + [len(rows)])
        return {k: v / sums[-1] for k, v in zip(keys, sums)}

    def run_eval(self, tag: str) -> dict[str, float] | None:
        if not self.eval_problems or self.rank != 0:
            return None
        r = self.cfg.rollout
        result = evaluate(self.llm, self.eval_problems, self.eval_ids, self.cfg.eval, self.stop,
                          mix_seed(self.cfg.seed, 7), desc=f"eval ({tag})", stop_at_answer=r.stop_at_answer,
                          vote=r.vote)
        self._write({"type": "eval", "step": self.step, **result})
        self.log(f"eval @ step {self.step}: " + "  ".join(f"{k} {v:.3f}" for k, v in result.items()
                                                       if k.split("@")[0] in ("greedy", "avg", "maj", "pass")))
        return result

    def fit(self) -> dict[str, Any]:
        cfg, start = self.cfg, time.perf_counter()
        wall0 = self.wall_s
        if self.step == 0 and cfg.eval.before:
            self.eval_before = self.run_eval("before")
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{cfg.method} steps", unit="step",
                   disable=self.rank != 0, file=sys.stdout)
        while self.step < self.total_steps:
            record = self.train_step()
            self.wall_s = wall0 + time.perf_counter() - start
            for j, row in enumerate(record.pop("inner", [])):
                self._write({"type": "optim", "step": record["step"], "optim_step": j + 1, **row})
            self._write({"type": "train", **record, "wall_s": self.wall_s})
            bar.update(1)
            if self.rank == 0:
                bar.write(self._line(record))
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                self.run_eval(f"step {self.step}")
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == self.total_steps:
                self.save()
        bar.close()
        after = self.run_eval("after")
        self.wall_s = wall0 + time.perf_counter() - start
        return self.summary(after)

    def summary(self, after: dict[str, float] | None) -> dict[str, Any]:
        return {"method": self.cfg.method, "steps": self.step, "rollout_tokens": self.rollout_tokens,
                "wall_s": round(self.wall_s, 1), "before": self.eval_before, "after": after}

    def save(self) -> Path:
        weights = self.backend.full_state_dict()  # a collective under ZeRO-3: every rank takes part
        loop = {"step": self.step, "rollout_tokens": self.rollout_tokens, "wall_s": self.wall_s,
                "eval_before": self.eval_before}
        cpu_weights = {k: v.cpu() for k, v in weights.items()} if self.rank == 0 else None
        return save_checkpoint(self.run_dir, self.step, _unwrap(self.model), self.tokenizer, cpu_weights,
                               self.backend.state_dict(), loop, self.rank, self.backend.barrier)

    # -- output ---------------------------------------------------------------------------------------------

    def _write(self, row: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _line(self, r: dict[str, Any]) -> str:
        shown = [fmt.format(r[k]) for k, fmt in SHOWN if k in r]
        return f"step {r['step']:>4}/{self.total_steps}  " + "  ".join(shown)


def _unwrap(model: PreTrainedModel) -> PreTrainedModel:
    return getattr(model, "module", model)


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop rows a killed run logged after its last checkpoint (they are recomputed)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))

