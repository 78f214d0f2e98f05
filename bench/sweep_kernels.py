"""Launch-config sweeps of the kernels that bench/sweep_logprob.py does not cover, for the next GPU session.

    python bench/sweep_kernels.py --out /tmp/sweep.json                     # GPU: every family below
    python bench/sweep_kernels.py --kernels logprob_dz,topk --out s.json    # a subset
    python bench/sweep_kernels.py --smoke --out s.json                      # CPU (Triton interpreter): plumbing only

Families (each config replaces the fixed one through credit_kernels._triton_utils.override_config, or the
module constants for tree attention and credit_reward; the library's fixed config is always the first row):
    logprob_dz   linear_logprob's backward logit-gradient kernel, timed as the whole backward (dz + two cuBLAS
                 matmuls: what the config changes is the dz kernel), x over one `hidden @ weight.T`
    topk         linear_topk's forward (k = 100), x over the matmul
    gather       linear_gather's forward (k = 100 ids + tail), x over the matmul
    logits_dz    linear_topk / linear_gather's backward logit-gradient kernel (whole backward, as logprob_dz)
    tree_fwd     tree_attention's forward (block sizes, warps, stages), x over its attended-FLOP floor
    credit_reward  the Triton credit_reward kernel (rows and tokens per program) at (B, T, M) shapes

Every row carries its error against an fp32 reference: a config that changes results is a bug, not a speedup.
Rows with an error (out of resources, a compile failure) are data points, not crashes. Write the winners back
into the fixed configs with the card, dtype and shape in the comment (STYLE: every tuned number names them).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import bench_ms, machine_info, write_json  # noqa: E402
from credit_kernels import _triton_utils as tu  # noqa: E402
from credit_kernels import (  # noqa: E402
    credit_reward,
    linear_gather,
    linear_gather_ref,
    linear_logprob,
    linear_logprob_ref,
    linear_topk,
    linear_topk_ref,
    tree_attention,
    tree_attention_ref,
)
from credit_kernels.reference import credit_reward_ref  # noqa: E402

# the modules, not the functions of the same names that credit_kernels re-exports
ta = importlib.import_module("credit_kernels.tree_attention")
cr = importlib.import_module("credit_kernels.credit_reward")

K = 100
# (BLOCK_N, BLOCK_V, BLOCK_D, GROUP_N, num_warps, num_stages); None = the library's fixed config
LINEAR_CONFIGS = {
    "logprob_dz": [None, (128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4), (64, 256, 64, 8, 4, 3),
                   (256, 128, 64, 8, 8, 3), (128, 256, 64, 16, 8, 4)],
    "topk": [None, (64, 64, 64, 8, 4, 3), (64, 128, 64, 8, 8, 3), (32, 128, 64, 8, 4, 3), (128, 64, 64, 8, 8, 3)],
    "gather": [None, (64, 64, 64, 8, 4, 3), (128, 128, 64, 8, 8, 3), (64, 256, 64, 8, 8, 3), (32, 256, 64, 8, 4, 3)],
    "logits_dz": [None, (128, 256, 64, 8, 8, 3), (64, 256, 64, 8, 4, 3), (128, 128, 64, 8, 4, 4)],
}
# (BLOCK_M, BLOCK_N, num_warps, num_stages)
TREE_CONFIGS = [None, (128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2)]
# (BLOCK_B, BLOCK_T, num_warps)
REWARD_CONFIGS = [None, (1, 2048, 8), (2, 1024, 8), (4, 512, 4), (1, 4096, 8), (8, 256, 4)]

GPU_LINEAR_SHAPES = [(16384, 3584, 151936), (4096, 1536, 151936)]
GPU_TREE = dict(prompts=8, prompt_len=2048, leaves=16, leaf_len=1152, hq=12, hkv=2, d=128)
GPU_REWARD_SHAPES = [(64, 32768, 3), (256, 8192, 4), (4096, 1024, 1)]
SMOKE_LINEAR_SHAPES = [(40, 32, 3001)]
SMOKE_TREE = dict(prompts=2, prompt_len=24, leaves=3, leaf_len=20, hq=4, hkv=2, d=16)
SMOKE_REWARD_SHAPES = [(5, 70, 2)]


def _linear_fields(cfg):
    bn, bv, bd, gn, nw, ns = cfg
    return dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, GROUP_N=gn, num_warps=nw, num_stages=ns)


def _inputs(case, dtype, device):
    n, d, vocab = case
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, d, generator=g, device=device).to(dtype)
    weight = (torch.randn(vocab, d, generator=g, device=device) / d**0.5 * 4).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g, device=device)
    upstream = torch.randn(n, K, generator=g, device=device)
    return hidden, weight, targets, upstream


def _linear_run(kernel, hidden, weight, targets, upstream):
    """(closure of one timed call, closure returning the outputs to compare with the reference)."""
    if kernel in ("topk", "gather"):
        ids = (hidden.float() @ weight.float().T).topk(K, dim=-1).indices if kernel == "gather" else None

        def fwd():
            with torch.no_grad():
                if kernel == "topk":
                    return linear_topk(hidden, weight, K, backend="triton").logp
                return linear_gather(hidden, weight, ids, backend="triton").logp

        return fwd, fwd
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    if kernel == "logits_dz":
        def bwd():
            h.grad = w.grad = None
            (upstream * linear_topk(h, w, K, backend="triton").logp).sum().backward()
            return torch.cat([h.grad.float().flatten(), w.grad.float().flatten()])
    else:
        def bwd():
            h.grad = w.grad = None
            (upstream[:, 0] * linear_logprob(h, w, targets, backend="triton", check_inputs=False)).sum().backward()
            return torch.cat([h.grad.float().flatten(), w.grad.float().flatten()])
    return bwd, bwd


def _linear_reference(kernel, hidden, weight, targets, upstream):
    h = hidden.detach().float().clone().requires_grad_(kernel.endswith("dz"))
    w = weight.detach().float().clone().requires_grad_(kernel.endswith("dz"))
    if kernel == "topk":
        return linear_topk_ref(h, w, K, chunk_rows=1024)[1]
    if kernel == "gather":
        ids = (h @ w.T).topk(K, dim=-1).indices
        return linear_gather_ref(h, w, ids, chunk_rows=1024)[0]
    if kernel == "logits_dz":
        (upstream * linear_topk_ref(h, w, K, chunk_rows=1024)[1]).sum().backward()
    else:
        (upstream[:, 0] * linear_logprob_ref(h, w, targets, chunk_rows=1024)).sum().backward()
    return torch.cat([h.grad.flatten(), w.grad.flatten()])


def sweep_linear(kernel, shapes, dtype, device, configs):
    rows = []
    for case in shapes:
        hidden, weight, targets, upstream = _inputs(case, dtype, device)
        ref = _linear_reference(kernel, hidden, weight, targets, upstream)
        floor = bench_ms(lambda: hidden @ weight.T, device)[0]
        for cfg in configs:
            fields = _linear_fields(cfg) if cfg else {}
            row = {"kernel": kernel, "shape": "x".join(map(str, case)), "config": fields or "fixed",
                   "matmul_ms": floor}
            ctx = tu.override_config(kernel, **fields) if fields else contextlib.nullcontext()
            try:
                with ctx:
                    timed, outputs = _linear_run(kernel, hidden, weight, targets, upstream)
                    out = outputs()
                    err = (out.float() - ref).abs().max().item()
                    row["max_abs_err" if kernel in ("topk", "gather") else "rel_err_grad"] = (
                        err if kernel in ("topk", "gather") else err / ref.abs().max().clamp(min=1e-30).item())
                    ms = bench_ms(timed, device)
                row.update(ms=ms[0], ms_p20=ms[1], ms_p80=ms[2], x_matmul=ms[0] / floor)
            except Exception as e:  # an out-of-resources config is a data point
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(row)
            rows.append(row)
    return rows


def _tree_inputs(spec, dtype, device):
    """A forest of `prompts` roots of prompt_len rows, each with `leaves` children of leaf_len rows (preorder)."""
    ve = []  # visible_end[j]: rows j..ve[j]-1 see row j, i.e. the end of j's node's subtree
    for _ in range(spec["prompts"]):
        root = len(ve)
        ve.extend([0] * spec["prompt_len"])
        for _ in range(spec["leaves"]):
            start = len(ve)
            ve.extend([start + spec["leaf_len"]] * spec["leaf_len"])  # causal inside the leaf
        ve[root:root + spec["prompt_len"]] = [len(ve)] * spec["prompt_len"]  # seen by its whole subtree
    u = len(ve)
    visible_end = torch.tensor(ve, dtype=torch.int32, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(u, h, spec["d"], generator=g, device=device).to(dtype)
               for h in (spec["hq"], spec["hkv"], spec["hkv"]))
    attended = (visible_end.long() - torch.arange(u, device=device)).sum().item()  # keys per query, summed
    return q, k, v, visible_end, attended


def sweep_tree(spec, dtype, device, configs):
    q, k, v, ve, attended = _tree_inputs(spec, dtype, device)
    ref = tree_attention_ref(q, k, v, ve).out.float()  # upcast inside: an fp32 reference
    flops = 4 * attended * spec["hq"] * spec["d"]  # QK^T and PV over the attended pairs
    floor = None
    if device.type == "cuda":
        a = torch.randn(8192, 8192, device=device, dtype=dtype)
        floor = flops / (2 * 8192**3 / bench_ms(lambda: a @ a, device)[0])  # ms at the card's matmul rate
    rows = []
    defaults = (ta.BLOCK_M, ta.BLOCK_N, ta.NUM_WARPS, ta.NUM_STAGES)
    for cfg in configs:
        bm, bn, nw, ns = cfg or defaults
        row = {"kernel": "tree_fwd", "shape": f"U={q.shape[0]} Hq={spec['hq']} Hkv={spec['hkv']} D={spec['d']}",
               "config": dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns) if cfg else "fixed",
               "attended_flops": flops, "floor_ms": floor}
        try:
            ta.NUM_WARPS, ta.NUM_STAGES = nw, ns
            plan = ta._build_plan(ve, bm, bn)
            out = tree_attention(q, k, v, plan, backend="triton").out
            row["max_abs_err"] = (out.float() - ref).abs().max().item()
            ms = bench_ms(lambda plan=plan: tree_attention(q, k, v, plan, backend="triton"), device)
            row.update(ms=ms[0], ms_p20=ms[1], ms_p80=ms[2])
            if floor:
                row["x_floor"] = ms[0] / floor
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            ta.NUM_WARPS, ta.NUM_STAGES = defaults[2], defaults[3]
        print(row)
        rows.append(row)
    return rows


def sweep_reward(shapes, device, configs):
    rows = []
    fixed = cr._config
    for b, t, m in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        a = -torch.rand(b, t, generator=g, device=device) * 5
        sh = -torch.rand(m, b, t, generator=g, device=device) * 5
        s = -torch.rand(b, t, generator=g, device=device) * 5
        mask = (torch.rand(b, t, generator=g, device=device) > 0.1).float()
        ref = credit_reward_ref(a, sh, s, mask, lam=0.5, baseline="mean")[0]
        for cfg in configs:
            row = {"kernel": "credit_reward", "shape": f"B={b} T={t} M={m}",
                   "config": dict(zip(("BLOCK_B", "BLOCK_T", "num_warps"), cfg)) if cfg else "fixed"}
            try:
                if cfg:
                    def patched(n_rows, n_tokens, n_partners, dev, cfg=cfg):
                        out = fixed(n_rows, n_tokens, n_partners, dev)
                        out.update(BLOCK_B=cfg[0], BLOCK_T=cfg[1], num_warps=cfg[2])
                        return out

                    cr._config = patched
                out = credit_reward(a, sh, s, mask, lam=0.5, backend="triton").rewards
                row["max_abs_err"] = (out - ref).abs().max().item()
                ms = bench_ms(lambda: credit_reward(a, sh, s, mask, lam=0.5, backend="triton"), device)
                row.update(ms=ms[0], ms_p20=ms[1], ms_p80=ms[2],
                           gbytes_per_s=(a.numel() * (m + 4) * 4) / (ms[0] * 1e6))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                cr._config = fixed
            print(row)
            rows.append(row)
    return rows


FAMILIES = ("logprob_dz", "topk", "gather", "logits_dz", "tree_fwd", "credit_reward")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--kernels", default=",".join(FAMILIES), help=f"comma list of {FAMILIES}")
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes, two configs per family")
    args = p.parse_args(argv)
    kernels = args.kernels.split(",")
    unknown = sorted(set(kernels) - set(FAMILIES))
    if unknown:
        p.error(f"unknown kernels {unknown}; choose from {FAMILIES}")
    cuda = torch.cuda.is_available()
    if not cuda and not (args.smoke and os.environ.get("TRITON_INTERPRET") == "1"):
        p.error("needs a CUDA device, or --smoke with TRITON_INTERPRET=1 set before triton is imported")
    device = torch.device("cuda" if cuda and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pick = (lambda cfgs: cfgs[:2]) if args.smoke else (lambda cfgs: cfgs)
    linear_shapes = SMOKE_LINEAR_SHAPES if args.smoke else GPU_LINEAR_SHAPES
    rows = []
    for kernel in kernels:
        if kernel in LINEAR_CONFIGS:
            rows += sweep_linear(kernel, linear_shapes, dtype, device, pick(LINEAR_CONFIGS[kernel]))
        elif kernel == "tree_fwd":
            rows += sweep_tree(SMOKE_TREE if args.smoke else GPU_TREE, dtype, device, pick(TREE_CONFIGS))
        else:
            rows += sweep_reward(SMOKE_REWARD_SHAPES if args.smoke else GPU_REWARD_SHAPES, device,
                                 pick(REWARD_CONFIGS))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = machine_info(device)
    meta.update(bench="sweep_kernels", dtype=str(dtype).removeprefix("torch."), smoke=args.smoke)
    write_json(args.out, meta, rows)


if __name__ == "__main__":
    main()
