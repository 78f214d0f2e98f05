"""Prefix-trie build time on CREDIT-shaped batches: compiled op vs Python twin, CPU.

    python bench/bench_trie.py                         # all workloads -> bench/results/trie_cpu.json
    python bench/bench_trie.py --quick --no-python     # small shapes, compiled op only

Workloads (token ids random in a 150k vocabulary; the sharing pattern is what matters):
  credit_256x12k   P=8 prompts x 32 sequences: a shared 256-token template, a 3840-token prompt, one of 4
                   4096-token feedbacks per prompt (8 sequences share each), a unique 4096-token response.
  sdpo_4096x2k     64 prompts x 64 sequences: 128-token template + 896-token prompt, unique 1024-token response.
  random_4096x2k   no sharing at all (every token is a new row; output-bound).
  identical_256x12k  one sequence 256 times (comparison-bound: every token is compared once).
  branchy_16384x256  vocabulary of 4 tokens (deep branching, ~16k hash probes per level).
Providers: `cpp_op` (torch.ops.credit_C.build_prefix_trie on flat tokens + offsets, the core), `cpp_api`
(build_prefix_trie on a list of 1-D tensors, including validation and concatenation), `cpp_from_lists` (the same
from Python int lists: conversion dominates), `python` (the Python twin on flat tokens + offsets), and
`floor_fill_outputs` (allocate and fill fresh tensors of the outputs' sizes: no builder can beat it).
Results: one JSON document, machine info + one record per (workload, provider), times in ms.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from credit_kernels import prefix_trie as pt  # noqa: E402
from credit_kernels._ext import HAS_EXT  # noqa: E402

VOCAB = 150_000


def _rand(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=g)


def make_workload(name: str, scale: float = 1.0) -> list[torch.Tensor]:
    """The sequences of one workload as 1-D int64 tensors; `scale` shrinks lengths and counts for --quick."""
    g = torch.Generator().manual_seed(0)

    def n(x):
        return max(1, int(x * scale))

    if name == "credit_256x12k":
        template = _rand(n(256), g)
        prompts = [torch.cat([template, _rand(n(3840), g)]) for _ in range(8)]
        feedback = [[_rand(n(4096), g) for _ in range(4)] for _ in range(8)]
        return [torch.cat([prompts[p], feedback[p][i // 8], _rand(n(4096), g)]) for p in range(8) for i in range(32)]
    if name == "sdpo_4096x2k":
        template = _rand(n(128), g)
        prompts = [torch.cat([template, _rand(n(896), g)]) for _ in range(64)]
        return [torch.cat([prompts[p], _rand(n(1024), g)]) for p in range(64) for _ in range(n(64))]
    if name == "random_4096x2k":
        return [_rand(n(2048), g) for _ in range(n(4096))]
    if name == "identical_256x12k":
        seq = _rand(n(12288), g)
        return [seq.clone() for _ in range(256)]
    if name == "branchy_16384x256":
        return [torch.randint(0, 4, (n(256),), generator=g) for _ in range(n(16384))]
    raise ValueError(f"unknown workload {name!r}")


WORKLOADS = ["credit_256x12k", "sdpo_4096x2k", "random_4096x2k", "identical_256x12k", "branchy_16384x256"]


def fill_outputs_floor(sizes: list[tuple[int, torch.dtype]]) -> None:
    """Allocate and fill fresh tensors of the trie's output sizes: the write floor of any builder."""
    for n, dtype in sizes:
        torch.empty(n, dtype=dtype).fill_(1)


def time_ms(fn, repeats: int) -> list[float]:
    fn()  # warm-up (first-touch of the output pages, allocator)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "card": "cpu",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "compiled_ext": HAS_EXT,
    }


def run(
    workloads, *, scale: float, repeats: int, with_python: bool, with_lists: bool, threads: list[int]
) -> list[dict]:
    have_op = HAS_EXT and hasattr(torch.ops.credit_C, "build_prefix_trie")
    default_threads = torch.get_num_threads()
    records = []
    for name in workloads:
        seqs = make_workload(name, scale)
        flat, offsets = pt._flatten_sequences(seqs)
        providers = {}  # name -> (fn, repeats, thread counts to try)
        if have_op:
            providers["cpp_op"] = (partial(torch.ops.credit_C.build_prefix_trie, flat, offsets), repeats, threads)
            providers["cpp_api"] = (partial(pt.build_prefix_trie, seqs, backend="cpp"), repeats, threads)
            if with_lists:
                lists = [s.tolist() for s in seqs]
                providers["cpp_from_lists"] = (
                    partial(pt.build_prefix_trie, lists, backend="cpp"),
                    max(1, repeats // 4),
                    threads[:1],
                )
        # The floor: allocate and fill fresh output tensors of the op's sizes (first-touch page faults
        # dominate on small VMs; the op cannot beat writing its own outputs).
        sizes = [(f.numel(), f.dtype) for f in pt.build_prefix_trie(seqs)]
        providers["floor_fill_outputs"] = (partial(fill_outputs_floor, sizes), repeats, threads)
        if with_python:
            providers["python"] = (partial(pt._build_prefix_trie_python, flat, offsets), 1, threads[:1])
        stats = pt.trie_stats(pt.build_prefix_trie(seqs))
        for provider, (fn, reps, thread_counts) in providers.items():
            for nt in thread_counts:
                torch.set_num_threads(nt)
                times = time_ms(fn, reps)
                rec = {
                    "workload": name,
                    "provider": provider,
                    "threads": nt,
                    "sequences": stats["sequences"],
                    "total_tokens": stats["total"],
                    "unique_tokens": stats["unique"],
                    "nodes": stats["nodes"],
                    "unique_ratio": round(stats["ratio"], 4),
                    "median_ms": round(statistics.median(times), 3),
                    "min_ms": round(min(times), 3),
                    "repeats": reps,
                    "mtokens_per_s": round(stats["total"] / statistics.median(times) / 1e3, 1),
                }
                records.append(rec)
                print(json.dumps(rec), flush=True)
        torch.set_num_threads(default_threads)
    return records


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=WORKLOADS, choices=WORKLOADS)
    ap.add_argument("--quick", action="store_true", help="lengths and counts x 1/8")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=sorted({1, torch.get_num_threads()}),
        help="torch thread counts for the compiled op (on a shared machine, 1 is the stable figure)",
    )
    ap.add_argument("--no-python", action="store_true", help="skip the Python twin (seconds per workload)")
    ap.add_argument("--no-lists", action="store_true", help="skip the from-Python-lists provider")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "trie_cpu.json")
    )
    args = ap.parse_args()
    scale = 0.125 if args.quick else 1.0
    info = machine_info()
    print(json.dumps(info), flush=True)
    records = run(
        args.workloads,
        scale=scale,
        repeats=args.repeats,
        with_python=not args.no_python,
        with_lists=not args.no_lists,
        threads=args.threads,
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": info, "scale": scale, "results": records}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
