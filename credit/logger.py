"""One `log(step, metrics)` for the trainer: always a JSONL file, optionally wandb.

Keys are namespaced (`train/loss`, `reward/mean`, `credit/pmi`, `eval/accuracy`). The config is logged
once at the start. On resume, lines of steps after the checkpoint are dropped, so no step appears twice.
"""

from __future__ import annotations

import json
import math
import os


class _NullBackend:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class RunLogger:
    def __init__(self, output: str, config: dict, *, backend: str = "jsonl", resume_step: int | None = None):
        os.makedirs(output, exist_ok=True)
        self.path = os.path.join(output, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            self._truncate_after(resume_step)
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run in an old directory starts a fresh log
        self.backend = _NullBackend()
        if backend == "wandb":
            try:
                import wandb

                self.backend = wandb.init(project="credit", config=config, resume="allow")
            except ImportError:
                print("credit: wandb is not installed; logging to metrics.jsonl only")
        self._write({"step": resume_step or 0, "config": config, "event": "resume" if resume_step else "start"})

    def _truncate_after(self, step: int) -> None:
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line from the kill
                if row.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        with open(self.path, "w") as f:
            f.writelines(kept)

    def _write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._write({"step": step, **clean})
        self.backend.log(clean, step=step)

    def finish(self) -> None:
        self.backend.finish()


def read_metrics(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "config" not in row:
                rows.append(row)
    return rows


def plot_curves(metrics_path: str, png_path: str, *, title: str = "") -> None:
    """Reward, loss and held-out accuracy against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    panels = [("reward/outcome", "outcome reward (train)"), ("train/loss", "loss"),
              ("eval/accuracy", "held-out accuracy"), ("credit/contrastive_pmi", "contrastive pMI")]
    panels = [(k, label) for k, label in panels if any(k in r for r in rows)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if key.startswith("eval") else None)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
