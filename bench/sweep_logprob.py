"""Sweep the GPU launch config of linear_logprob's Triton forward against cuBLAS on the same card.

    python bench/sweep_logprob.py --out /tmp/sweep.json         # GPU only

Each config replaces the library's fixed Hopper starting point (credit_kernels.linear_logprob._config) for the
forward kernel; the row of the best config per shape is what to write back into _config. Reports median ms,
the ratio to `hidden @ weight.T` (matmul only) measured in the same process, and the max |logp error| against
an fp32 reference (a config that changes results is a bug, not a speedup).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import importlib  # noqa: E402
from bench.bench_logprob import make_inputs  # noqa: E402
from bench.common import bench_ms, machine_info, write_json  # noqa: E402
from credit_kernels import linear_logprob, linear_logprob_ref  # noqa: E402

# the module, not the function of the same name that credit_kernels re-exports
ll = importlib.import_module("credit_kernels.linear_logprob")

SHAPES = [(16384, 3584, 151936), (16384, 1536, 151936)]
# (BLOCK_N, BLOCK_V, BLOCK_D, GROUP_N, num_warps, num_stages)
CONFIGS = [
    (128, 128, 64, 8, 8, 3),  # the first untimed starting point
    (128, 256, 64, 8, 8, 3),  # the library's forward config since the H200 sweep
    (128, 128, 64, 8, 4, 4),
    (128, 256, 64, 16, 8, 4),
    (256, 128, 64, 8, 8, 3),
    (128, 128, 128, 8, 8, 2),
    (128, 256, 64, 8, 8, 4),
    (256, 128, 64, 8, 8, 4),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default=None, help="comma list of NxdxV (default: the three above)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sweep_logprob needs a CUDA device")
    device = torch.device("cuda")
    shapes = SHAPES if not args.shapes else [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    default_config = ll._config
    rows = []
    for case in shapes:
        hidden, weight, targets, _ = make_inputs(case, torch.bfloat16, device)
        ref = linear_logprob_ref(hidden.float(), weight.float(), targets, chunk_rows=2048)
        floor = bench_ms(lambda: hidden @ weight.T, device)[0]
        print(f"{case}: matmul {floor:.3f} ms")
        for bn, bv, bd, gn, nw, ns in CONFIGS:
            cfg = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, GROUP_N=gn, num_warps=nw, num_stages=ns)
            row = {"shape": "x".join(map(str, case)), **cfg, "matmul_ms": floor}
            ll._config = lambda *args, cfg=cfg: dict(cfg)
            try:
                with torch.no_grad():
                    out = linear_logprob(hidden, weight, targets, backend="triton", check_inputs=False)
                    row["max_abs_err_logp"] = (out - ref).abs().max().item()
                    ms = bench_ms(lambda: linear_logprob(hidden, weight, targets, backend="triton",
                                                         check_inputs=False), device)
                row.update(ms=ms[0], x_matmul=ms[0] / floor)
                print(f"  {cfg}: {ms[0]:.3f} ms  x{ms[0] / floor:.2f}  err {row['max_abs_err_logp']:.2e}")
            except Exception as e:  # an out-of-resources config is a data point, not a crash
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"  {cfg}: {row['error']}")
            finally:
                ll._config = default_config
            rows.append(row)
        del hidden, weight, targets, ref
        torch.cuda.empty_cache()
    meta = machine_info(device)
    meta.update(bench="sweep_logprob")
    write_json(args.out, meta, rows)


if __name__ == "__main__":
    main()
