"""Train with test-time RL on unlabeled problems.

    python -m ettrl.run                                    # offline default: configs/default.yaml
    python -m ettrl.run --config configs/paper/x.yaml method=ettrl trainer.lr=1e-6
    python -m ettrl.run --resume runs/default-20260101-120000

Writes RUN_DIR/{config.yaml, metrics.jsonl, curves.png, summary.json, checkpoints/}.
Multi-GPU: `deepspeed --num_gpus 8 --module ettrl.run ... trainer.backend=deepspeed`
or `torchrun --nproc_per_node 8 -m ettrl.run ...`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ettrl.config import Config, ConfigError, load_config, save_config


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m ettrl.run", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", help="YAML config (default: the built-in offline default)")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    ap.add_argument("--run-dir", help="where to write the run (default: OUTPUT_DIR/NAME-TIME)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. trainer.lr=1e-6")
    return ap.parse_args(argv)


def load_run_config(args: argparse.Namespace) -> tuple[Config, Path]:
    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume continues a run with its saved config.yaml; "
                              "drop --config and key=value overrides")
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there; give the directory of an earlier run")
        return load_config(run_dir / "config.yaml"), run_dir
    cfg = load_config(args.config, args.overrides)
    run_dir = (Path(args.run_dir) if args.run_dir
               else Path(cfg.output_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg, run_dir


def init_distributed(cfg: Config) -> tuple[int, int]:
    """Under a launcher (RANK/WORLD_SIZE set) with the DeepSpeed backend: join the process group."""
    if cfg.trainer.backend != "deepspeed":
        return 0, 1
    from ettrl.backends.deepspeed_backend import init_distributed as ds_init

    return ds_init(cfg.device)


def shared_run_dir(run_dir: Path, world: int) -> Path:
    """All ranks write into rank 0's run directory (its name holds rank 0's clock), as an absolute path: a launcher
    on another node may start its processes in another working directory."""
    if world == 1:
        return run_dir
    import torch.distributed as dist

    box = [str(run_dir.absolute())]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def format_summary(summary: dict) -> str:
    before, after = summary.get("before") or {}, summary.get("after") or {}
    keys = [k for k in after if k.split("@")[0] in ("greedy", "avg", "maj", "pass")]
    lines = [f"{'metric':<10}{'before':>9}{'after':>9}{'change':>9}"] if keys else []
    for k in keys:
        b, a = before.get(k), after[k]
        change = f"{100 * (a - b):+8.1f}" if b is not None else ""
        lines.append(f"{k:<10}{'' if b is None else f'{100 * b:8.1f}%':>9}{100 * a:8.1f}%{change:>9}")
    lines.append(f"method {summary['method']}  steps {summary['steps']}  rollout tokens {summary['rollout_tokens']:,}"
                 f"  wall {summary['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, run_dir = load_run_config(args)
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"config error: {e}")
    rank, world = init_distributed(cfg)
    run_dir = shared_run_dir(run_dir, world)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            save_config(cfg, run_dir / "config.yaml")
        print(f"run dir: {run_dir}  method: {cfg.method}  model: {cfg.model.name}  data: {cfg.data.train}", flush=True)

    from ettrl.data import DataError
    from ettrl.plots import plot_curves
    from ettrl.trainer import Trainer

    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        trainer = Trainer(cfg, run_dir, resume=bool(args.resume), log=log)
    except (ConfigError, DataError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    summary = trainer.fit()
    if rank == 0:
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", f"{cfg.name}: {cfg.method}")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(format_summary(summary))
        print(f"wrote {run_dir}/{{metrics.jsonl, curves.png, summary.json, checkpoints/}}", flush=True)
    return summary


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
