"""CREDIT rewards + pMI diagnostics: the fused op vs the Python oracle, side by side in one process.

    python bench/bench_credit_reward.py                       # GPU: teacher-scoring shapes, bf16
    python bench/bench_credit_reward.py --shapes cpu          # CPU: small shapes, fp32
    python bench/bench_credit_reward.py --smoke --out /tmp/credit_reward.json   # CI: tiny shapes, seconds

The op is memory-bound: it reads a, s, mask [B, T] and b [M, B, T] once and writes the [B, T] rewards, so the
figure of merit is the effective bandwidth (bytes that must move / time) and the speedup over the oracle.
Providers:
    oracle          credit.credit_rewards + credit.sequence_pmi, check_inputs=False (~15 torch kernels)
    oracle_checked  the same with check_inputs=True (3 NaN scans, 3 device syncs)
    credit          credit_kernels.credit_reward, backend="auto", check_inputs=False
    credit_checked  the same with check_inputs=True (one sync on the [B] outputs)
    credit_cpp / credit_triton / credit_cuda   explicit backends, where they can run
Mode: "fwd" only (the rewards are advantages: no backward); --baseline picks "mean" (default) or "logmeanexp".
Reports median ms (p20/p80), GB/s, the speedup over "oracle" (x_oracle) and the max error of every output vs an
fp64 reference from the same inputs, relative to its natural scale (the magnitudes its fp32 evaluation adds up).
Writes JSON (card, versions, commit) and a PNG.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    bench_ms,
    machine_info,
    peak_extra_mib,
    plot_results,
    results_path,
    write_json,
)
from credit import credit_rewards, sequence_pmi  # noqa: E402
from credit_kernels import _ext  # noqa: E402
from credit_kernels.credit_reward import HAS_TRITON, credit_reward  # noqa: E402

PROVIDERS = ["oracle", "oracle_checked", "credit", "credit_checked", "credit_cpp", "credit_triton", "credit_cuda"]

# (B, T, M). To move to bench/shapes.py (the registry) as CREDIT_REWARD_*.
# GPU: 32 prompts x 8 rollouts = 256 responses of up to 8192 tokens with M = 1..8 partners (docs/method.md,
# SDPO's published settings), a long-response case and a many-short-responses case.
SHAPES_GPU = [(256, 8192, 1), (256, 8192, 4), (256, 2048, 8), (64, 32768, 2), (4096, 512, 4)]
SHAPES_CPU = [(64, 2048, 1), (64, 2048, 4), (256, 1024, 4)]
SHAPES_SMOKE = [(8, 300, 2), (3, 1000, 5)]


LAM = 0.5


def _oracle(a, sh, s, mask, baseline, check):
    r = credit_rewards(a, sh, s, mask, lam=LAM, baseline=baseline, check_inputs=check)
    return (r, *sequence_pmi(a, sh, s, mask, check_inputs=check))


def _fused(backend, check):
    return lambda a, sh, s, k, baseline: credit_reward(a, sh, s, k, lam=LAM, baseline=baseline, backend=backend,
                                                       check_inputs=check)


FNS = {
    "oracle": lambda a, sh, s, k, baseline: _oracle(a, sh, s, k, baseline, False),
    "oracle_checked": lambda a, sh, s, k, baseline: _oracle(a, sh, s, k, baseline, True),
    "credit": _fused("auto", False),
    "credit_checked": _fused("auto", True),
    "credit_cpp": _fused("cpp", False),
    "credit_triton": _fused("triton", False),
    "credit_cuda": _fused("cuda", False),
}


def unavailable(provider: str, device: torch.device) -> str | None:
    """Why a provider cannot run here, or None."""
    if provider == "credit_cpp" and (device.type != "cpu" or not _ext.HAS_EXT):
        return "needs CPU tensors and the built extension"
    if provider == "credit_triton":
        if not HAS_TRITON:
            return "triton not installed"
        if device.type != "cuda":
            return "needs CUDA (the interpreter is for correctness, not timing)"
    if provider == "credit_cuda" and (device.type != "cuda" or not _ext.HAS_EXT_CUDA):
        return "needs CUDA and _C built with CUDA kernels"
    return None


def make_inputs(case, dtype, device):
    """Seeded log-prob-like a, s [B, T], b [M, B, T] in [-12, 0], a bool mask with ~80% of the tokens kept."""
    b, t, m = case
    g = torch.Generator(device="cpu").manual_seed(0)
    a = (-12 * torch.rand(b, t, generator=g)).to(dtype).to(device)
    sh = (-12 * torch.rand(m, b, t, generator=g)).to(dtype).to(device)
    s = (-12 * torch.rand(b, t, generator=g)).to(dtype).to(device)
    mask = (torch.rand(b, t, generator=g) < 0.8).to(device)
    return a, sh, s, mask


def setup(case, provider: str, dtype: torch.dtype, device: torch.device, baseline: str = "mean"):
    """A closure running one call of `provider`; shared by the timing and memory runs."""
    a, sh, s, mask = make_inputs(case, dtype, device)
    fn = FNS[provider]
    return lambda: fn(a, sh, s, mask, baseline)


def reference(case, dtype, device, baseline="mean"):
    """fp64 outputs from the same (rounded) inputs, and the scale each output's error is measured against."""
    a, sh, s, mask = (x.cpu() for x in make_inputs(case, dtype, device))
    a, sh, s = (torch.where(mask, x.double(), 0.0) for x in (a, sh, s))
    num = sh.shape[0]
    mean = sh.mean(0)
    beta = mean if baseline == "mean" else torch.logsumexp(sh, 0) - math.log(num)
    r = torch.where(mask, a - s - LAM * (beta - s), 0.0)
    contrastive = a.sum(-1) - (torch.logsumexp(sh.sum(-1), 0) - math.log(num))
    ref = (r, (a - s).sum(-1), contrastive, torch.where(mask, a - mean, 0.0).sum(-1))
    bmax = sh.abs().amax(0)
    scales = (a.abs() + 2 * s.abs() + bmax + 1, (a.abs() + s.abs()).sum(-1) + 1, (a.abs() + bmax).sum(-1) + 1,
              (a.abs() + bmax).sum(-1) + 1)
    return ref, scales


def run_case(case, providers, dtype, device, baseline="mean", check_errors=True):
    b, t, m = case
    elt = torch.empty((), dtype=dtype).element_size()
    # bytes that must move: read a, s, b (M + 2 rows of T) and the bool mask, write fp32 rewards and 3 [B] sums
    moved = b * t * ((m + 2) * elt + 1 + 4) + 3 * 4 * b
    ref = reference(case, dtype, device, baseline) if check_errors else None
    names = ("rewards", "pmi", "contrastive_pmi", "surrogate")
    rows = []
    for provider in providers:
        row = {"shape": f"{b}x{t}x{m}", "B": b, "T": t, "M": m, "dtype": str(dtype).replace("torch.", ""),
               "baseline": baseline, "provider": provider, "mode": "fwd"}
        reason = unavailable(provider, device)
        if reason:
            rows.append({**row, "skipped": reason})
            print(f"  {provider:15s} skipped: {reason}")
            continue
        try:
            fn = setup(case, provider, dtype, device, baseline)
            out = fn()
            if ref is not None:
                for name, got, exp, scale in zip(names, out, *ref):
                    row[f"max_rel_err_{name}"] = ((got.double().cpu() - exp).abs() / scale).max().item()
            del out
            ms = bench_ms(fn, device)
            mem = peak_extra_mib(fn, device)
        except Exception as e:  # a provider failing on a shape is a result, not a crash
            rows.append({**row, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"  {provider:15s} ERROR {type(e).__name__}: {str(e)[:120]}")
            continue
        row.update(ms=ms[0], ms_p20=ms[1], ms_p80=ms[2], gbps=moved / (ms[0] * 1e-3) / 1e9, peak_extra_mib=mem)
        rows.append(row)
        worst = max(v for k, v in row.items() if k.startswith("max_rel_err_")) if ref is not None else float("nan")
        print(f"  {provider:15s} {ms[0]:9.3f} ms  {row['gbps']:8.1f} GB/s"
              + (f"  {mem:9.1f} MiB" if mem is not None else "") + f"  max rel err {worst:.2e}")
    base = next((r["ms"] for r in rows if r["provider"] == "oracle" and "ms" in r), None)
    for r in rows:
        if "ms" in r and base is not None:
            r["x_oracle"] = base / r["ms"]  # speedup over the oracle, > 1 is faster
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", choices=["gpu", "cpu", "smoke"], default=None, help="shape set (default by device)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, for CI")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list from {PROVIDERS}")
    p.add_argument("--baseline", choices=["mean", "logmeanexp"], default="mean", help="beta over the partners")
    p.add_argument("--dtype", default=None, help="bf16 (GPU default), fp16 or fp32 (CPU default)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/credit_reward_<card>.json)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    shape_set = "smoke" if args.smoke else (args.shapes or ("gpu" if device.type == "cuda" else "cpu"))
    cases = {"gpu": SHAPES_GPU, "cpu": SHAPES_CPU, "smoke": SHAPES_SMOKE}[shape_set]
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    providers = args.providers.split(",")
    unknown = [x for x in providers if x not in FNS]
    if unknown:
        p.error(f"unknown provider(s) {unknown}; choose from {PROVIDERS}")
    meta = machine_info(device)
    meta.update(bench="credit_reward", shape_set=shape_set, baseline=args.baseline, lam=LAM)
    out = args.out or results_path(meta, "credit_reward")

    results = []
    for case in cases:
        print(f"B={case[0]} T={case[1]} M={case[2]} {dtype} baseline={args.baseline} on {meta['card']}")
        results += run_case(case, providers, dtype, device, args.baseline)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_json(out, meta, results)
    if not args.no_plot:
        plot_results(out, out.replace(".json", ".png"), title="credit_reward")
    return results


if __name__ == "__main__":
    main()
