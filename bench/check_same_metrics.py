"""Check that a restructure leaves training unchanged: rerun short `credit train` runs and compare their metrics.

    python bench/check_same_metrics.py --record runs/baseline         # with the reference tree on PYTHONPATH
    python bench/check_same_metrics.py --against runs/baseline        # with the current tree; exit 1 on a difference

Each run is `credit train --max-steps 3 --seed 0` on CPU (fp32, transformers generate) for grpo, sdpo and credit
at token level and sdpo / credit at --level topk, on a tiny random Llama (made here, seeded, with SmolLM2's
tokenizer) and on the embedded SmolLM2-135M. Every logged metric except timings must be equal (exactly by
default, or within --atol). Checkpoints are deleted after each run to keep the disk small.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys

RUNS = {
    "grpo": ["--method", "grpo"],
    "sdpo": ["--method", "sdpo"],
    "credit": ["--method", "credit"],
    "sdpo_topk": ["--method", "sdpo", "--level", "topk"],
    "credit_topk": ["--method", "credit", "--level", "topk"],
}
COMMON = ["--max-steps", "3", "--seed", "0", "--device", "cpu", "--dtype", "fp32", "--rollout", "hf",
          "--no-progress", "--eval-max", "4", "--save-every", "0", "--sample-every", "3"]


def make_tiny_model(path: str) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer (the one tests/conftest.py builds), saved at `path`."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from credit.models import save_random_llama

    return save_random_llama(path)


def run_one(out_dir: str, model: str, flags: list[str], timeout: float) -> list[dict]:
    """Run one `credit train`, return its metrics.jsonl rows (timings dropped)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "credit", "train", "--model", model, "--output", out_dir, *COMMON, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    shutil.rmtree(os.path.join(out_dir, "ckpt"), ignore_errors=True)
    return read_metrics(out_dir)


def read_metrics(out_dir: str) -> list[dict]:
    rows = []
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            row = {k: v for k, v in row.items() if not k.startswith("time/") and k not in ("_time", "wall")}
            if isinstance(row.get("config"), dict):  # the logged config names the run directory
                row["config"] = {k: v for k, v in row["config"].items() if k != "output"}
            rows.append(row)
    return rows


def compare(name: str, got: list[dict], want: list[dict], atol: float) -> list[str]:
    problems = []
    if len(got) != len(want):
        return [f"{name}: {len(got)} metric rows, recorded {len(want)}"]
    for i, (g, w) in enumerate(zip(got, want)):
        if set(g) != set(w):
            problems.append(f"{name} row {i}: keys differ: only now {sorted(set(g) - set(w))}, "
                            f"only recorded {sorted(set(w) - set(g))}")
        for k in sorted(set(g) & set(w)):
            a, b = g[k], w[k]
            same = a == b or (isinstance(a, float) and isinstance(b, float)
                              and (math.isnan(a) and math.isnan(b) or abs(a - b) <= atol))
            if not same:
                problems.append(f"{name} row {i} {k}: now {a!r}, recorded {b!r}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", help="directory to write the reference runs to")
    mode.add_argument("--against", help="directory of recorded runs to compare with")
    p.add_argument("--models", default="tiny,embedded", help="comma list of tiny | embedded")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    p.add_argument("--work", default=None, help="where the new runs go (default: <against>/../check_now)")
    p.add_argument("--atol", type=float, default=0.0, help="allowed absolute difference of a metric (default exact)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--reuse", action="store_true", help="compare the runs already in --work instead of rerunning")
    args = p.parse_args(argv)

    root = os.path.abspath(args.record or args.against)
    work = root if args.record else os.path.abspath(args.work or os.path.join(os.path.dirname(root), "check_now"))
    os.makedirs(work, exist_ok=True)
    problems = []
    for model in args.models.split(","):
        path = make_tiny_model(os.path.join(root, "tiny_model")) if model == "tiny" else model
        for run in args.runs.split(","):
            name = f"{model}_{run}"
            out = os.path.join(work, name)
            rows = read_metrics(out) if args.reuse and not args.record else run_one(out, path, RUNS[run], args.timeout)
            if args.record:
                print(f"recorded {name}: {len(rows)} rows", flush=True)
                continue
            found = compare(name, rows, read_metrics(os.path.join(root, name)), args.atol)
            print(f"{name}: {'same' if not found else f'{len(found)} differences'}", flush=True)
            problems += found
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
