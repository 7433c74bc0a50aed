"""curves.png: training reward / majority ratio / entropy per step, and eval accuracy over steps."""
from __future__ import annotations

import json
from pathlib import Path

PANELS = [("reward", "reward"), ("majority_ratio", "majority ratio"), ("label_acc", "label accuracy"),
          ("entropy", "entropy"), ("rollout_tokens_total", "rollout tokens (cumulative)")]


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("type") == "train"], [r for r in rows if r.get("type") == "eval"]


def plot_curves(metrics_path: Path, out_path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics_path)
    panels = [(k, name) for k, name in PANELS if any(k in r for r in train)]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.6 * (len(panels) + 1), 3.2))
    for ax, (key, name) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in train if key in r]
        ax.plot(*zip(*pts), marker=".", lw=1)
        ax.set_title(name)
        ax.set_xlabel("step")
    ax = axes[-1]
    for key in sorted({k for r in evals for k in r if k.split("@")[0] in ("greedy", "avg", "maj", "pass")}):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        ax.plot(*zip(*pts), marker="o", label=key)
    ax.set_title("held-out accuracy")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    if evals:
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)
