"""One dataclass tree for a run: YAML files plus dotted `key=value` overrides, validated up front.

`load_config(path, overrides)` is the only entry point; every error names the key and what to change.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ettrl.advantages import SHAPINGS
from ettrl.data import DataError, check_source
from ettrl.methods import METHODS, method_spec


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # engine.model_files spec or a local HF directory
    dtype: str = "float32"  # trainer weights: float32 | bfloat16 (the engine's copy: engine.dtype)
    gradient_checkpointing: bool = False


@dataclass
class EngineSection:
    """The rollout engine's switches: every field of engine.config.EngineConfig but `model` (model.name), passed
    to LLM(...) as they are (tests/test_config.py keeps the two in step; docs/engine.md explains each). Where the
    trainer's defaults differ: dtype "auto" is bfloat16 on CUDA and float32 on the CPU (not the checkpoint's own
    dtype, the engine's auto), device "auto" is the run's `device`, and gpu_memory_utilization is 0.4 (the policy,
    its gradients and optimizer state share the GPU; the KV pool is freed during each update)."""
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_tokens: int | None = None
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.4
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int | None = None
    decode_share: float = 0.6
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    pack_weights: bool = True
    fused_ops: bool = True
    fused_decode: bool = True
    attention_backend: str = "auto"
    matmul_kernel: str = "auto"
    batch_invariant: bool = True


MOVED_KEYS = {"model.engine_dtype": "engine.dtype", "model.gpu_memory_utilization": "engine.gpu_memory_utilization"}


@dataclass
class DataConfig:
    train: str = "arithmetic"  # "arithmetic" (built-in), a .jsonl/.json/.parquet file, or a HF dataset name
    eval: str = "arithmetic"  # held-out set, same forms; "" skips evaluation
    train_split: str = "train"  # HF datasets only
    eval_split: str = "test"
    problem_field: str = "problem"
    answer_field: str = "answer"  # optional in the data: ground truth is only logged
    train_size: int = 64  # problems generated (arithmetic) or kept (files; 0 = all)
    eval_size: int = 32
    difficulty: int = 1  # arithmetic task level, 1..3
    prompt: str = "fewshot"  # fewshot | plain | chat
    seed: int = 0


@dataclass
class RolloutConfig:
    n_votes: int = 16  # responses that vote (parallel); trees give trees * (1 + forks * branches)
    n_train: int = 8  # responses per prompt used for the update (vote-then-sample)
    temperature: float = 0.6
    top_p: float = 1.0
    max_tokens: int = 48
    trees: int = 3  # ETMR: M (3 trees x (1 + 2 x 2) = 15 leaves; 0.66-0.69x the tokens of 16 parallel, measured)
    forks: int = 2  # ETMR: N
    branches: int = 2  # ETMR: B
    fork_metric: str = "surprisal"  # surprisal (Algorithm 1: -log p of the sampled token) | entropy
    distinct: bool = False
    no_fork_after: list[str] = field(default_factory=lambda: ["\\boxed{"])  # no fork from the first of these on
    min_gap: int = 1  # fork positions of a root at least this many tokens apart
    stop_at_answer: bool = False  # end each response at its first complete \boxed{...} (rollouts and evaluation);
    # off by default: over 8 seeds the offline default trains worse with it (docs/results.md, "Method sweep")
    vote: str = "boxed"  # boxed (last box, equivalence classes) | ttrl (TTRL's answer strings, truncated ones too)
    last_number_fallback: bool = False  # vote=boxed: untruncated answers without \boxed{} vote with their last number
    train_pick: str = "random"  # which n_train of the votes train: random (seeded) | first (TTRL) | stratified


@dataclass
class AlgoConfig:
    reshape: str = "auto"  # auto (the method's shaping) | a name in ettrl/advantages.py SHAPINGS: none | res | clip
    res_alpha: float = 0.2
    res_beta: float = 0.2
    res_direction: str = "equations"  # Adv-Res: equations (Eqs. 12-14, docs/algorithms.md 5) | prose (the paper's text)
    clip_beta: float = 2.0
    entropy_adv: bool = False  # Cheng et al. entropy-advantage term
    entropy_alpha: float = 0.4
    entropy_kappa: float = 2.0
    rent_beta: float = 1.0
    dare_alpha: float = 0.5
    dare_tau: float = 0.05
    std: str = "population"  # GRPO group std: population | bessel (verl/TTRL, n - 1)


@dataclass
class TrainerConfig:
    backend: str = "torch"  # torch | deepspeed
    zero_stage: int = 2
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup_ratio: float = 0.03
    grad_clip: float = 1.0
    prompts_per_step: int = 4
    micro_batch_size: int = 8  # sequences per forward/backward
    share_prompt: bool = True  # a micro-batch runs each prompt once for all its responses (same loss, less compute)
    epochs: int = 1
    max_steps: int = 0  # 0 = ceil(epochs * len(train) / prompts_per_step), or with drop_last epochs * floor(...)
    eps_low: float = 0.2
    eps_high: float = 0.2
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean
    kl_coef: float = 0.0  # low_var_kl (k3 clamped to [-10, 10]) to the frozen initial policy; TTRL: 0.001
    mini_batch_prompts: int = 0  # prompts per optimizer step (TTRL: 1); 0 = all of the step's (one optimizer step)
    ppo_epochs: int = 1  # passes over the step's mini-batches
    clip_ratio_c: float = 0.0  # dual-clip bound for A < 0 (verl: 3.0); 0 = off
    drop_last: bool = False  # drop each epoch's last partial batch of prompts, as TTRL's dataloader


@dataclass
class EvalConfig:
    k: int = 16
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 48
    greedy: bool = True
    before: bool = True  # score the eval set before training too (a sweep skips it where a same-seed run has it)


@dataclass
class Config:
    name: str = "default"
    method: str = "ttrl"  # a name in ettrl/methods.py: ttrl | etmr | ear | ettrl | rent | dare
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    output_dir: str = "runs"
    save_every: int = 10  # checkpoint every this many steps (0 = only at the end)
    eval_every: int = 0  # evaluate every this many steps (0 = only before and after training)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineSection = field(default_factory=EngineSection)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def tree(self) -> bool:
        return method_spec(self.method).rollout == "tree"

    @property
    def n_votes(self) -> int:
        """Responses that vote per prompt: parallel samples, or every leaf of the ETMR trees."""
        r = self.rollout
        return r.trees * (1 + r.forks * r.branches) if self.tree else r.n_votes

    @property
    def shaping(self) -> str:
        """The advantage shaping (ettrl/advantages.py SHAPINGS): algo.reshape, or the method's."""
        if self.algo.reshape != "auto":
            return self.algo.reshape
        return method_spec(self.method).shaping

    @property
    def entropy_term(self) -> bool:
        """The Cheng et al. per-token entropy bonus: algo.entropy_adv, or on by the method's definition."""
        return self.algo.entropy_adv or method_spec(self.method).entropy_term


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and what to change."""


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; "
                              "pass --config with a YAML file such as configs/default.yaml")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a YAML mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. trainer.lr=1e-6")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else "")
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    d = asdict(cfg)
    d["trainer"]["betas"] = list(d["trainer"]["betas"])
    return d


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _set_dotted(raw: dict, key: str, value) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    node[parts[-1]] = value


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if f"{prefix}{key}" in MOVED_KEYS:
            raise ConfigError(f"{prefix}{key} is now {MOVED_KEYS[prefix + key]} (the engine's switches live in the "
                              f"engine section); rename the key")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    kwargs = {}
    for name, value in raw.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, typ, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value, typ, key: str):
    args = typing.get_args(typ)
    if type(None) in args:  # X | None: null (or an empty override) is None
        if value is None or value == "":
            return None
        typ = next(a for a in args if a is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typ is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(float(v) for v in value)
    elif typing.get_origin(typ) is list:  # list[str]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
    raise ConfigError(f"{key} must be a {typ.__name__}, got {value!r}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate_engine(section: EngineSection) -> None:
    """The engine's own checks (EngineConfig), its messages given the section's key names."""
    from engine.config import EngineConfig

    options = {**asdict(section), "device": "cpu"}  # the device is resolved when the engine is built
    try:
        EngineConfig(model="", **options)
    except ValueError as error:
        raise ConfigError(f"engine.{error}") from None


def validate(cfg: Config) -> None:
    """Reject configs that cannot run, before any model is loaded."""
    r, t, a, e = cfg.rollout, cfg.trainer, cfg.algo, cfg.eval
    _check(cfg.method in METHODS, f"method={cfg.method!r} is unknown; choose one of {', '.join(METHODS)}")
    _check(cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
           f"device={cfg.device!r}: use auto, cpu or cuda")
    _check(cfg.model.dtype in ("float32", "bfloat16", "float16"),
           f"model.dtype={cfg.model.dtype!r}: use float32 or bfloat16")
    _validate_engine(cfg.engine)
    _check(cfg.data.prompt in ("fewshot", "plain", "chat"),
           f"data.prompt={cfg.data.prompt!r}: use fewshot, plain or chat")
    _check(1 <= cfg.data.difficulty <= 3, f"data.difficulty={cfg.data.difficulty}: use 1, 2 or 3")
    _check(bool(cfg.data.problem_field), "data.problem_field must name the field that holds the problem text")
    _check(bool(cfg.data.train), "data.train must name the unlabeled problems: 'arithmetic', a file or a dataset name")
    for key, source in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        try:
            if source:
                check_source(source, key)
        except DataError as error:
            raise ConfigError(str(error)) from None
    _check(r.n_votes >= 1 and r.n_train >= 1, "rollout.n_votes and rollout.n_train must be >= 1")
    if cfg.tree:
        _check(r.trees >= 1 and r.forks >= 0 and r.branches >= 1,
               "rollout.trees >= 1, rollout.forks >= 0, rollout.branches >= 1")
    _check(r.n_train <= cfg.n_votes,
           f"rollout.n_train={r.n_train} is more than the {cfg.n_votes} responses that vote per prompt"
           + (f" (rollout.trees * (1 + forks * branches) for method={cfg.method})" if cfg.tree
              else " (rollout.n_votes)")
           + "; lower rollout.n_train or raise the number of votes")
    _check(r.temperature > 0, "rollout.temperature must be > 0 (test-time RL needs diverse samples)")
    _check(0 < r.top_p <= 1 and 0 < e.top_p <= 1, "top_p must be in (0, 1]")
    _check(r.max_tokens >= 1 and e.max_tokens >= 1, "max_tokens must be >= 1")
    _check(r.fork_metric in ("entropy", "surprisal"),
           f"rollout.fork_metric={r.fork_metric!r}: use entropy or surprisal")
    _check(r.train_pick in ("random", "first", "stratified"),
           f"rollout.train_pick={r.train_pick!r}: use random, first or stratified (round-robin over the trees)")
    _check(r.vote in ("boxed", "ttrl"), f"rollout.vote={r.vote!r}: use boxed or ttrl (TTRL's string vote)")
    _check(r.vote == "boxed" or not r.last_number_fallback,
           "rollout.last_number_fallback is an option of rollout.vote=boxed; vote=ttrl has TTRL's own fallbacks "
           "(the answer-is phrase, the last number): drop rollout.last_number_fallback")
    _check(r.vote == "boxed" or method_spec(cfg.method).reward != "dare",
           f"method={cfg.method} groups the answers itself (DARE); rollout.vote=ttrl is TTRL's majority vote: "
           "use rollout.vote=boxed")
    _check(r.min_gap >= 1, f"rollout.min_gap={r.min_gap}: use 1 (any spacing) or more tokens between forks")
    _check(all(isinstance(m, str) and m for m in r.no_fork_after),
           f"rollout.no_fork_after={r.no_fork_after!r}: use a list of non-empty strings, e.g. ['\\boxed{{']")
    _check(a.std in ("population", "bessel"), f"algo.std={a.std!r}: use population or bessel")
    _check(a.reshape in ("auto", *SHAPINGS),
           f"algo.reshape={a.reshape!r}: use auto, {', '.join(SHAPINGS[:-1])} or {SHAPINGS[-1]}")
    _check(a.res_direction in ("equations", "prose"),
           f"algo.res_direction={a.res_direction!r}: use equations (the paper's Eqs. 12-14) or prose (its text)")
    _check(t.backend in ("torch", "deepspeed"), f"trainer.backend={t.backend!r}: use torch or deepspeed")
    _check(t.zero_stage in (0, 1, 2, 3), f"trainer.zero_stage={t.zero_stage}: use 0, 1, 2 or 3")
    _check(t.lr > 0, "trainer.lr must be > 0")
    _check(0 <= t.warmup_ratio < 1, "trainer.warmup_ratio must be in [0, 1)")
    _check(t.grad_clip > 0, "trainer.grad_clip must be > 0 (the norm gradients are clipped to)")
    _check(t.prompts_per_step >= 1 and t.micro_batch_size >= 1,
           "trainer.prompts_per_step and trainer.micro_batch_size must be >= 1")
    _check(t.epochs >= 1 and t.max_steps >= 0, "trainer.epochs must be >= 1 and trainer.max_steps >= 0")
    _check(t.loss_agg in ("token-mean", "seq-mean-token-mean"),
           f"trainer.loss_agg={t.loss_agg!r}: use token-mean or seq-mean-token-mean")
    _check(t.eps_low >= 0 and t.eps_high >= 0 and t.kl_coef >= 0, "trainer.eps_low, eps_high and kl_coef must be >= 0")
    _check(t.ppo_epochs >= 1, "trainer.ppo_epochs must be >= 1")
    _check(t.clip_ratio_c == 0 or t.clip_ratio_c > 1, "trainer.clip_ratio_c must be 0 (off) or > 1 (verl: 3.0)")
    _check(0 <= t.mini_batch_prompts <= t.prompts_per_step and t.prompts_per_step % max(1, t.mini_batch_prompts) == 0,
           f"trainer.mini_batch_prompts={t.mini_batch_prompts} must divide trainer.prompts_per_step="
           f"{t.prompts_per_step} (0 = one optimizer step per rollout batch)")
    _check(e.k >= 1 and e.temperature > 0, "eval.k must be >= 1 and eval.temperature > 0")
    _check(cfg.save_every >= 0 and cfg.eval_every >= 0, "save_every and eval_every must be >= 0")
