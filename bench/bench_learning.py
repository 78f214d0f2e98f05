"""Does the default run learn? Held-out accuracy before and after the default `credit train` run, for grpo,
sdpo and credit with the same seed and steps, with the wall time of each run.

    python bench/bench_learning.py                  # three default CPU runs, one after another
    python bench/bench_learning.py --task largest_shortcut --max-steps 30

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

from bench.common import machine_info, write_json  # noqa: E402
from credit.config import TrainConfig  # noqa: E402
from credit.trainer import train  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="grpo,sdpo,credit")
    p.add_argument("--task", default=TrainConfig.task)
    p.add_argument("--max-steps", type=int, default=TrainConfig.max_steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="embedded")
    p.add_argument("--runs", default="runs/learning", help="parent directory of the runs")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    rows = []
    for method in args.methods.split(","):
        cfg = TrainConfig(method=method, task=args.task, max_steps=args.max_steps, seed=args.seed, model=args.model,
                          output=os.path.join(args.runs, f"{args.task}_{method}"), progress=False)
        t0 = time.perf_counter()
        summary = train(cfg)
        wall = time.perf_counter() - t0
        with open(os.path.join(cfg.output, "metrics.jsonl")) as f:
            steps = [json.loads(line) for line in f if '"time/step"' in line]
        rows.append({"method": method, "task": args.task, "steps": args.max_steps, "seed": args.seed,
                     "accuracy_before": summary["accuracy_before"], "accuracy_after": summary["accuracy_after"],
                     "eval": summary["eval"], "wall_seconds": wall,
                     "train_accuracy": [s.get("train/accuracy") for s in steps],
                     "shortcut_rate": [s.get("task/shortcut_rate") for s in steps if "task/shortcut_rate" in s],
                     "config": cfg.to_dict()})
        print(f"{method}: held-out {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f} in {wall:.0f} s")
    meta = machine_info(torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda"))
    meta.update(bench="learning", torch_threads=torch.get_num_threads())
    card = meta["card"].replace(" ", "_").replace("(", "").replace(")", "")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"learning_{args.task}_{card}.json")
    write_json(out, meta, rows)
    _plot(rows, out.replace(".json", ".png"))


def _plot(rows, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in rows:
        ax.plot([e[0] for e in r["eval"]], [e[1] for e in r["eval"]], marker="o", label=r["method"])
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title(f"task {rows[0]['task']}, seed {rows[0]['seed']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
