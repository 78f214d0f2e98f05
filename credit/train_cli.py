"""`credit train`, `credit eval` and `credit viz` (registered on credit.cli)."""

from __future__ import annotations

import argparse
import os

from credit.cli import UsageError, command
from credit.config import TrainConfig, add_config_arguments, config_from_args


@command("train", "train a policy with GRPO, SDPO or CREDIT (defaults: embedded SmolLM2-135M, task 'largest')",
         add_config_arguments)
def _train(args: argparse.Namespace) -> int:
    from credit.trainer import train

    train(config_from_args(args))
    return 0


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="'embedded', a model directory, or a hub id")
    p.add_argument("--run", default=None, help="a run directory: evaluate its last checkpoint's student")
    p.add_argument("--task", default="largest")
    p.add_argument("--data", default="", help="JSONL held-out records (default: the synthetic task's held-out split)")
    p.add_argument("--n-heldout", type=int, default=0,
                   help="held-out inputs of a synthetic task (0 = the task's default, as credit train)")
    p.add_argument("--max-new-tokens", type=int, default=TrainConfig.max_new_tokens,
                   help="response length cap (default: the same as credit train's)")
    p.add_argument("--sampled", type=int, default=0,
                   help="also the accuracy of this many sampled replies per input (seeded: --seed)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)


@command("eval", "held-out accuracy (greedy) of a model or of a run's last checkpoint", _eval_arguments)
def _eval(args: argparse.Namespace) -> int:
    import torch

    from credit.checkpoint import latest_checkpoint
    from credit.envs import get_task, load_jsonl
    from credit.models import load_model, resolve_device, resolve_dtype
    from credit.evaluation import evaluate_heldout

    cfg = TrainConfig(model=args.model, task=args.task, n_heldout=args.n_heldout, max_new_tokens=args.max_new_tokens,
                      device=args.device, seed=args.seed, eval_max=0, eval_sampled=args.sampled)
    env = get_task(cfg.task)
    records = load_jsonl(args.data, cfg.task) if args.data else env.splits(seed=cfg.seed, n_heldout=cfg.n_heldout or None).heldout
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device))
    if args.run:
        ckpt = latest_checkpoint(args.run)
        if ckpt is None:
            raise UsageError(f"--run {args.run}: no checkpoint (ckpt/step_*/) in that directory; train there first or pass "
                             "another run directory")
        model.load_state_dict(torch.load(os.path.join(ckpt, "student.pt"), map_location=device))
        print(f"evaluating {ckpt}")
    res = evaluate_heldout(model, tokenizer, env, records, cfg)
    lo, hi = res.greedy_interval
    line = f"held-out accuracy: {res.greedy:.3f} greedy (95% interval {lo:.3f}-{hi:.3f})"
    if res.samples:
        line += f", {res.sampled:.3f} sampled ({res.samples} per input)"
    if res.shortcut_greedy is not None:
        line += f", shortcut rate {res.shortcut_greedy:.3f}"
    print(f"{line} on {len(records)} records of task {cfg.task}")
    return 0


def _viz_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (its samples/step_*.json)")
    p.add_argument("--step", type=int, default=None, help="which saved batch (default: the last)")
    p.add_argument("--out", default=None, help="HTML path (default: <run>/viz.html)")


@command("viz", "HTML page of a batch's per-token rewards, SDPO and CREDIT side by side", _viz_arguments)
def _viz(args: argparse.Namespace) -> int:
    from credit.viz import latest_samples, write_page

    path = (os.path.join(args.run, "samples", f"step_{args.step:06d}.json") if args.step is not None
            else latest_samples(args.run))
    if not os.path.exists(path):
        raise UsageError(f"--step {args.step}: {path} does not exist (samples are saved every --sample-every steps)")
    out = write_page(path, args.out or os.path.join(args.run, "viz.html"))
    print(f"wrote {out}")
    return 0
