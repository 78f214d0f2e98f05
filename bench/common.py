"""Shared benchmark plumbing: timing, peak memory, machine/version metadata, JSON results, plots.

Every claim is a ratio against a peer or the "matmul only" floor measured in the same process on the
same card, so each results file carries its card, versions, commit and shapes.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUANTILES = (0.5, 0.2, 0.8)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return {
        "card": card,
        "device": str(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger-kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "credit": _version("credit"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


def bench_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 25, rep: int = 100) -> list[float]:
    """[median, p20, p80] in ms. CUDA: triton.testing.do_bench; CPU: wall clock over a few runs."""
    if device.type == "cuda":
        import triton.testing

        return list(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES)))
    fn()  # warm-up (compilation, allocator)
    times = []
    budget = time.perf_counter() + 2.0
    while len(times) < 3 or (len(times) < 20 and time.perf_counter() < budget):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return [statistics.median(times), q[1], q[7]]


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated by `fn` beyond what was live before it (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - base) / 2**20


def write_json(path: str, meta: dict, results: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"wrote {path} ({len(results)} rows)")


def plot_results(json_path: str, png_path: str, *, title: str, metric: str = "ms") -> None:
    """One panel per mode: grouped bars of `metric` per shape and provider, from a results file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        doc = json.load(f)
    rows = [r for r in doc["results"] if r.get(metric) is not None]
    modes = sorted({r["mode"] for r in rows})
    if not rows:
        return
    fig, axes = plt.subplots(len(modes), 1, figsize=(11, 3.6 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        sel = [r for r in rows if r["mode"] == mode]
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        providers = list(dict.fromkeys(r["provider"] for r in sel))
        width = 0.8 / max(len(providers), 1)
        for i, prov in enumerate(providers):
            vals = [next((r[metric] for r in sel if r["shape"] == s and r["provider"] == prov), float("nan"))
                    for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=prov)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(f"{title}: {mode} ({doc['meta']['card']})", fontsize=10)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    print(f"wrote {png_path}")


def measure(row: dict, make_fn: Callable[[], Callable[[], object]], device: torch.device, *, work_flops: float | None,
            errors: Callable[[object], dict] | None = None, label: str = "") -> dict:
    """One provider on one case: its errors (errors(first output) -> columns), [median, p20, p80] ms, TFLOP/s and
    peak extra MiB, added to `row`. A provider that fails (a peer out of memory, say) is a result, not a crash."""
    try:
        fn = make_fn()
        out = fn()
        if errors is not None:
            row.update(errors(out))
        del out
        ms = bench_ms(fn, device)
        mem = peak_extra_mib(fn, device)
    except Exception as e:
        print(f"  {label} ERROR {type(e).__name__}: {str(e)[:120]}")
        return {**row, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    tflops = work_flops / (ms[0] * 1e-3) / 1e12 if work_flops else None
    row.update(ms=ms[0], ms_p20=ms[1], ms_p80=ms[2], tflops=tflops, peak_extra_mib=mem)
    print(f"  {label} {ms[0]:9.3f} ms" + (f"  {tflops:7.2f} TFLOP/s" if tflops is not None else "")
          + (f"  {mem:9.1f} MiB" if mem is not None else "")
          + (f"  err {row['max_abs_err_logp']:.2e}" if "max_abs_err_logp" in row else ""))
    return row


def add_floor_ratios(rows: list[dict], floor_provider: str = "matmul") -> None:
    """x_matmul_floor = ms / the floor provider's ms in the same mode, measured in the same run."""
    floor = {r["mode"]: r["ms"] for r in rows if r["provider"] == floor_provider and "ms" in r}
    for r in rows:
        if "ms" in r and r["mode"] in floor:
            r["x_matmul_floor"] = r["ms"] / floor[r["mode"]]


def results_path(meta: dict, name: str, suffix: str = ".json") -> str:
    """bench/results/<name>_<card>.json"""
    card = meta["card"].replace(" ", "_").replace("(", "").replace(")", "")
    return os.path.join(ROOT, "bench", "results", f"{name}_{card}{suffix}")


# ---- the logit-level benchmarks (bench_logprob.py, bench_topk.py): one command line, one shape registry ----


def add_logit_arguments(p, *, name: str, providers: list[str], providers_help: str) -> None:
    """The flags bench_logprob.py and bench_topk.py share (each adds its own beside them)."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", choices=["gpu", "cpu", "smoke"], default=None, help="shape set (default by device)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, for CI")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--providers", default=",".join(providers), help=providers_help)
    p.add_argument("--dtype", default=None, help="bf16 (GPU default), fp16 or fp32 (CPU default)")
    p.add_argument("--out", default=None, help=f"JSON path (default bench/results/{name}_<card>.json)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--cases", default=None, help="comma list of NxdxV to run from the shape set (default: all)")


def logit_run(args) -> tuple[torch.device, str, list[tuple[int, int, int]], torch.dtype]:
    """(device, shape set, its selected (N, d, V) cases, dtype) from the shared flags."""
    from bench import shapes

    device = torch.device(args.device)
    shape_set = "smoke" if args.smoke else (args.shapes or ("gpu" if device.type == "cuda" else "cpu"))
    cases = {"gpu": shapes.LOGPROB_GPU, "cpu": shapes.LOGPROB_CPU, "smoke": shapes.LOGPROB_SMOKE}[shape_set]
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    return device, shape_set, shapes.select(cases, args.cases), dtype


def logit_case_modes(modes: list[str], case, device: torch.device, shape_set: str) -> list[str]:
    """The modes to run for one case: on the GPU set, fwd+bwd only at bench/shapes.py's backward shapes."""
    from bench import shapes

    return [m for m in modes if m == "fwd" or device.type != "cuda" or shape_set != "gpu"
            or case in shapes.LOGPROB_GPU_BWD]
