"""Step time of the trainer, with its breakdown: generate / environment / teacher scoring / update.

    python bench/bench_step.py                      # the issue's setting: embedded SmolLM2-135M, 16 rollouts x 64
                                                    # new tokens (P=4, G=4), CREDIT with M=1, on this machine
    python bench/bench_step.py --model /path --steps 5 --device cuda

The first step is a warm-up and is reported apart. Writes bench/results/step_<card>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import machine_info, results_path, write_json  # noqa: E402
from credit.config import TrainConfig  # noqa: E402
from credit.trainer import ema_update, setup, train_step  # noqa: E402

PHASES = ("time/generate", "time/sync_weights", "time/env", "time/teacher", "time/update")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument("--task", default="largest")
    p.add_argument("--method", default="credit")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--rollouts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-partners", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    cfg = TrainConfig(model=args.model, task=args.task, method=args.method, prompts_per_step=args.prompts,
                      rollouts_per_prompt=args.rollouts, max_new_tokens=args.max_new_tokens,
                      num_partners=args.num_partners, device=args.device, output=tempfile.mkdtemp(), progress=False)
    t0 = time.perf_counter()
    run = setup(cfg)
    load_s = time.perf_counter() - t0
    device = next(run.student.parameters()).device
    rows = []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        m, _, _ = train_step(cfg, step, run.student, run.tokenizer, run.env, run.train_records, run.credit_teacher,
                             run.optimizer, sampler=run.sampler)
        if run.teacher is not None:
            ema_update(run.teacher, run.student, cfg.ema_rate)
        if device.type == "cuda":
            torch.cuda.synchronize()
        row = {k: m[k] for k in PHASES if k in m}
        row.update(step=step, warmup=step == 0, total=time.perf_counter() - t0,
                   response_len=m["train/response_len"], unique_ratio=m.get("scorer/unique_ratio"))
        rows.append(row)
        print(f"step {step}{' (warm-up)' if step == 0 else ''}: total {row['total']:.1f} s  "
              + "  ".join(f"{k.split('/')[1]} {row[k]:.1f}" for k in PHASES if k in row))
    timed = [r for r in rows if not r["warmup"]] or rows
    summary = {k: statistics.median(r[k] for r in timed) for k in (*PHASES, "total") if k in timed[0]}
    meta = machine_info(device)
    meta.update(bench="step", model=args.model, task=args.task, method=args.method, prompts=args.prompts,
                rollouts=args.rollouts, max_new_tokens=args.max_new_tokens, num_partners=args.num_partners,
                load_seconds=load_s, median=summary, torch_threads=torch.get_num_threads())
    out = args.out or results_path(meta, "step")
    write_json(out, meta, rows)
    print("median: " + "  ".join(f"{k} {v:.1f} s" for k, v in summary.items()))
    return summary


if __name__ == "__main__":
    main()
