"""Tree attention vs the peers that do not share prefixes, in one process.

    python bench/bench_tree_attention.py               # GPU: the workloads below; CPU: one tiny case (CI)
    python bench/bench_tree_attention.py --quick       # GPU: smaller workloads
    python bench/bench_tree_attention.py --mode fwd+bwd   # forward + backward of q, k, v (random upstream gradient)

Providers:
    tree_triton   credit tree_attention, Triton kernel, plan (block lists) built once outside the timing
    tree_flex     credit tree_attention, FlexAttention (compiled on GPU), plan with its BlockMask built once outside
                  (CPU fwd+bwd: torch has no CPU flex backward, so it is recorded as an error)
    tree_torch    the chunked dense-mask reference (CPU only: it is O(U^2) work)
    sdpa_padded   every sequence expanded (shared prefixes recomputed), padded to the longest, SDPA causal

Workloads (teacher scoring shapes, Qwen2-1.5B attention: Hq=12, Hkv=2, D=128, bf16):
    anchors   P=8 prompts of 2048 tokens; under each, 16 (feedback 128 + response 1024) leaves
              (G=4 rollouts x (M+1)=4 contexts per prompt), docs/design.md, "Benchmarks".
    sdpo      8 prompts (1024) x 2 feedback contexts (own group and one partner, M=1), each a shared
              sibling solution (600) over 7 failing responses with long-tailed lengths (64..4096).

Output: JSON lines in bench/results/tree_attention_<device>.jsonl (fwd+bwd: tree_attention_bwd_<device>.jsonl),
one per (workload, provider), with card, versions, commit, shape, mode, times (20/50/80 % quantiles, ms), peak
MiB, the attended key count and the "matmul floor": the attended FLOPs (fwd: QK^T, PV; fwd+bwd: those and the
backward's five, 3.5x) at this card's measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from credit_kernels.tree_attention import tree_attention, tree_attention_plan, tree_attention_ref  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---------------------------------------------------------------------------------------------------------------------
# workloads: a tree of (length, children) nodes laid out in preorder, as PrefixTrie does
# ---------------------------------------------------------------------------------------------------------------------
def layout(roots):
    """Preorder rows of a (length, children) forest -> (visible_end [U] int32, sequences as row lists)."""
    ve, seqs = [], []

    def visit(node, path):
        length, children = node
        start = len(ve)
        ve.extend([0] * length)
        rows = path + list(range(start, start + length))
        for c in children:
            visit(c, rows)
        if not children:
            seqs.append(rows)
        ve[start:start + length] = [len(ve)] * length  # each row sees its node's whole subtree

    for r in roots:
        visit(r, [])
    return torch.tensor(ve, dtype=torch.int32), seqs


def anchors_tree(scale=1):
    lp, lf, lr = 2048 // scale, 128 // scale, 1024 // scale
    return [(lp, [(lf + lr, [])] * 16) for _ in range(8)]


def sdpo_tree(scale=1, seed=0):
    rng = random.Random(seed)

    def resp():  # long-tailed response lengths
        return max(64 // scale, min(4096 // scale, int(rng.lognormvariate(math.log(600), 0.8)) // scale))

    return [(1024 // scale, [(600 // scale, [(resp(), []) for _ in range(7)]) for _ in range(2)]) for _ in range(8)]


def tiny_tree():
    return [(40, [(24, [(9, []), (17, [])]), (31, [])]), (23, [])]


# ---------------------------------------------------------------------------------------------------------------------
# providers
# ---------------------------------------------------------------------------------------------------------------------
def setup(ve, seqs, provider, *, hq, hkv, d, dtype, device, mode="fwd"):
    """Inputs for one provider; returns a zero-argument callable that runs the attention (and its backward)."""
    u = ve.numel()
    grad = mode == "fwd+bwd"
    ve = ve.to(device)
    if provider == "sdpa_padded":
        lmax = max(len(s) for s in seqs)
        b = len(seqs)
        # padded per-sequence batch; right padding is never attended by real rows under is_causal
        qkv = [torch.randn(b, h, lmax, d, device=device, dtype=dtype, requires_grad=grad) for h in (hq, hkv, hkv)]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        fn = lambda: (sdpa(*qkv, is_causal=True, enable_gqa=True),)  # noqa: E731
    else:
        qkv = [torch.randn(u, h, d, device=device, dtype=dtype, requires_grad=grad) for h in (hq, hkv, hkv)]
        if provider in ("tree_triton", "tree_flex"):
            backend = provider[len("tree_"):]
            plan = tree_attention_plan(type("T", (), {"visible_end": ve})(), backend=backend)
            fn = lambda: tree_attention(*qkv, plan, backend=backend)  # noqa: E731
        elif provider == "tree_torch":
            fn = lambda: tree_attention_ref(*qkv, ve)  # noqa: E731
        else:
            raise ValueError(f"unknown provider {provider!r}")
    if not grad:
        return fn
    g = None

    def fwd_bwd():
        nonlocal g
        out = fn()[0]
        g = torch.randn_like(out) if g is None else g  # one random upstream gradient, drawn outside the timing
        return torch.autograd.grad(out, qkv, g)

    fwd_bwd()
    return fwd_bwd


def timeit(fn, device):
    """(p20, p50, p80) in ms."""
    if device == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=100))
    fn()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    return ts[1], ts[2], ts[3]


def matmul_tflops(device):
    """The card's bf16 matmul rate, for the floor every attention time is compared to."""
    if device != "cuda":
        return None
    import triton.testing

    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms = triton.testing.do_bench(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def meta(device):
    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        commit = None
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    return dict(
        card=torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        torch=torch.__version__, triton=triton_v, cuda=torch.version.cuda, commit=commit,
    )  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="GPU: workloads 4x shorter")
    ap.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd", help="time the forward, or forward + backward")
    ap.add_argument("--out", default=None,
                    help="JSONL path (default bench/results/tree_attention[_bwd]_<device>.jsonl)")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        s = 4 if args.quick else 1
        workloads = {"anchors": anchors_tree(s), "sdpo": sdpo_tree(s)}
        providers = ["tree_triton", "tree_flex", "sdpa_padded"]
        heads = dict(hq=12, hkv=2, d=128, dtype=torch.bfloat16)
    else:  # CI: one tiny case, the paths that run on CPU
        workloads = {"tiny": tiny_tree()}
        providers = ["tree_torch", "tree_flex", "sdpa_padded"]
        heads = dict(hq=4, hkv=2, d=64, dtype=torch.float32)
    info = meta(device)
    floor_tflops = matmul_tflops(device)
    os.makedirs(RESULTS, exist_ok=True)
    path = args.out or os.path.join(RESULTS, f"tree_attention{'_bwd' if args.mode != 'fwd' else ''}_{device}.jsonl")
    with open(path, "w") as f:
        for name, roots in workloads.items():
            ve, seqs = layout(roots)
            u = ve.numel()
            attended = int((ve.long() - torch.arange(u)).sum())  # key j is seen by rows j .. ve[j]-1
            flops = 4 * heads["d"] * heads["hq"] * attended  # QK^T and PV
            flops = flops * 3.5 if args.mode == "fwd+bwd" else flops  # + QK^T, dP, dV, dK, dQ
            expanded = sum(len(s) for s in seqs)
            for provider in providers:
                torch.manual_seed(0)
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    fn = setup(ve, seqs, provider, device=device, mode=args.mode, **heads)
                    times = timeit(fn, device)
                    err = None
                except Exception as e:  # a peer that cannot run here is reported, not fatal
                    times, err = (None, None, None), f"{type(e).__name__}: {e}"[:300]
                rec = dict(
                    info, workload=name, provider=provider, mode=args.mode, U=u, sequences=len(seqs),
                    expanded_tokens=expanded, padded_tokens=len(seqs) * max(len(s) for s in seqs),
                    attended_pairs=attended, hq=heads["hq"], hkv=heads["hkv"], d=heads["d"],
                    dtype=str(heads["dtype"]).replace("torch.", ""),
                    ms_p20=times[0], ms_p50=times[1], ms_p80=times[2],
                    tflops=flops / (times[1] * 1e-3) / 1e12 if times[1] else None,
                    floor_ms=flops / (floor_tflops * 1e12) * 1e3 if floor_tflops else None,
                    peak_mib=torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None, error=err,
                )  # fmt: skip
                f.write(json.dumps(rec) + "\n")
                f.flush()
                ms = f"{times[1]:9.3f} ms" if times[1] else "   failed"
                print(f"{name:8s} {provider:12s} {args.mode:7s} U={u:7d} {ms}" + (f"  ({err})" if err else ""))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
