"""Does the default run learn? Held-out accuracy before and after the default `credit train` run, for grpo,
sdpo and credit with the same seed and steps, with the wall time of each run.

    python bench/bench_learning.py                  # three default CPU runs, one after another
    python bench/bench_learning.py --seeds 0,1      # each method on two seeds (single runs are noisy)
    python bench/bench_learning.py --task largest_shortcut --max-steps 30
    python bench/bench_learning.py --collect runs/a runs/b   # rows from finished run directories

Writes bench/results/learning_<task>_<card>.json and a plot of held-out accuracy against steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import machine_info, results_path, write_json  # noqa: E402
from credit.config import TrainConfig  # noqa: E402
from credit.trainer import train  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="grpo,sdpo,credit")
    p.add_argument("--task", default=TrainConfig.task)
    p.add_argument("--max-steps", type=int, default=TrainConfig.max_steps)
    p.add_argument("--seeds", default="0", help="comma list of seeds; every method runs on each")
    p.add_argument("--model", default="embedded")
    p.add_argument("--runs", default="runs/learning", help="parent directory of the runs")
    p.add_argument("--out", default=None)
    p.add_argument("--collect", nargs="*", default=None,
                   help="instead of training, collect finished run directories (their summary.json, metrics.jsonl)")
    args = p.parse_args(argv)

    rows = [] if args.collect is None else [_collect(run) for run in args.collect]
    runs = [] if args.collect is not None else [(m, int(seed)) for seed in args.seeds.split(",")
                                                  for m in args.methods.split(",")]
    for method, seed in runs:
        cfg = TrainConfig(method=method, task=args.task, max_steps=args.max_steps, seed=seed, model=args.model,
                          output=os.path.join(args.runs, f"{args.task}_{method}_seed{seed}"), progress=False)
        t0 = time.perf_counter()
        train(cfg)
        rows.append(_collect(cfg.output, wall=time.perf_counter() - t0))
    for r in rows:
        print(f"{r['label']} seed {r['seed']}: held-out {r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f} "
              f"({r['steps']} steps, {r['train_seconds']:.0f} s in steps)")
    for label, gain in _mean_gains(rows).items():
        print(f"{label}: mean gain {gain['mean_gain']:+.3f} over seeds {gain['seeds']}")
    meta = machine_info(torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda"))
    meta.update(bench="learning", torch_threads=torch.get_num_threads())
    out = args.out or results_path(meta, f"learning_{args.task}")
    meta.update(mean_gains=_mean_gains(rows))
    write_json(out, meta, rows)
    _plot(rows, out.replace(".json", ".png"))


def _mean_gains(rows: list[dict]) -> dict:
    """Per label: the held-out accuracy gain (after - before) averaged over its seeds."""
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    return {label: {"seeds": [r["seed"] for r in rs],
                    "mean_gain": sum(r["accuracy_after"] - r["accuracy_before"] for r in rs) / len(rs)}
            for label, rs in by_label.items()}


def _collect(run: str, wall: float | None = None) -> dict:
    """One result row from a finished run directory."""
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    config, steps = None, []
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "config" in row:
                config = row["config"]
            elif "time/step" in row:
                steps.append(row)
    return {"run": run, "label": _label(config), "method": config["method"], "task": config["task"], "steps": summary["steps"],
            "seed": config["seed"], "lr": config["lr"], "accuracy_before": summary["accuracy_before"],
            "accuracy_after": summary["accuracy_after"], "eval": summary["eval"], "wall_seconds": wall,
            "train_seconds": sum(s["time/step"] for s in steps),
            "train_accuracy": [s.get("train/accuracy") for s in steps],
            "shortcut_rate": [s["task/shortcut_rate"] for s in steps if "task/shortcut_rate" in s],
            "config": config}


def _label(config: dict) -> str:
    """The method, plus the method options that differ from the defaults (e.g. "credit lam=1.0")."""
    defaults = TrainConfig().to_dict()
    keys = ("level", "lam", "baseline", "swap", "mu", "num_partners", "lr", "teacher")
    diff = [f"{k}={config[k]}" for k in keys if config.get(k) != defaults[k]]
    return " ".join([config["method"], *diff])


def _plot(rows, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    colors = {}
    for r in rows:
        color = colors.setdefault(r["label"], f"C{len(colors)}")
        ax.plot([e[0] for e in r["eval"]], [e[1] for e in r["eval"]], marker="o", color=color,
                linestyle=["-", "--", ":", "-."][r["seed"] % 4], label=f"{r['label']} seed {r['seed']}")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title(f"task {rows[0]['task']}, {len(rows)} runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
