"""Fused top-k and gather (+ tail) log-probs vs the materialised torch path, side by side in one process.

    python bench/bench_topk.py                       # GPU: the bench/shapes.py shapes, bf16
    python bench/bench_topk.py --shapes cpu          # CPU: small shapes
    python bench/bench_topk.py --smoke --out /tmp/topk.json   # CI: tiny shapes, seconds

Ops: "topk100" and "topk20" (linear_topk, the student's top-k of SDPO's logit-level loss, k = 100 for
science/tool use, 20 for code) and "gather" (linear_gather: log-probs at 100 given ids, the student's
top-k, plus the tail bucket; the teacher's side). Modes: "fwd" (no grad) and "fwdbwd" (forward +
backward of (g * logp).sum() (+ (g_tail * tail).sum() for gather) w.r.t. hidden and weight, g fixed
random). Providers: matmul (the floor: h @ W.T; in fwdbwd the same matmul with its 2 backward matmuls),
naive (logits -> log_softmax -> topk / gather, tail = log1p(-sum p) as usually written), chunked (the
reference, 4096-row chunks), compiled (torch.compile of naive), credit (ours, backend "auto"),
credit_triton (ours, backend "triton"). Reports median ms (p20/p80), TFLOP/s (2NdV per matmul), peak
extra MiB (CUDA), x_matmul_floor, max |logp error| (by rank for top-k), the fraction of top-k ids equal to
the reference's, max |tail error| and gradient relative errors vs an fp32 reference from the same inputs.
Writes JSON (card, versions, commit) and a PNG, in bench_logprob.py's layout; rows add "op" and "k",
and the plot's shape label starts with the op.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    add_floor_ratios,
    add_logit_arguments,
    logit_case_modes,
    logit_run,
    machine_info,
    measure,
    plot_results,
    results_path,
    write_json,
)
from credit_kernels.linear_gather import linear_gather  # noqa: E402
from credit_kernels.linear_topk import linear_topk  # noqa: E402
from credit_kernels.reference import linear_gather_ref, linear_topk_ref  # noqa: E402

PROVIDERS = ["matmul", "naive", "chunked", "compiled", "credit"]
OPS = {"topk100": 100, "topk20": 20, "gather": 100}  # op -> k


# --- top-k providers: (h, w, k) -> (ids, logp) ---


def _naive_topk(h, w, k):
    logp, ids = (h @ w.T).float().log_softmax(-1).topk(k, dim=-1)
    return ids, logp


def _chunked_topk(h, w, k):
    ids, logp, _ = linear_topk_ref(h, w, k, upcast=False, chunk_rows=4096)
    return ids, logp


def _credit_topk(backend):
    def fn(h, w, k):
        out = linear_topk(h, w, k, backend=backend, check_inputs=False)
        return out.ids, out.logp

    return fn


# --- gather providers: (h, w, ids) -> (logp, tail) ---


def _naive_gather(h, w, ids):
    logp = (h @ w.T).float().log_softmax(-1).gather(-1, ids)
    return logp, torch.log1p(-logp.exp().sum(-1))  # cancels to -inf / NaN when the mass is ~1


def _chunked_gather(h, w, ids):
    return linear_gather_ref(h, w, ids, upcast=False, chunk_rows=4096)


def _credit_gather(backend):
    def fn(h, w, ids):
        return tuple(linear_gather(h, w, ids, backend=backend, check_inputs=False))

    return fn


_compiled = {}


def _compiled_fn(op):
    if op not in _compiled:
        _compiled[op] = torch.compile(_naive_gather if op == "gather" else _naive_topk, dynamic=False)
    return _compiled[op]


def provider_fn(op, provider):
    """The closure (h, w, k_or_ids) -> outputs of `provider` for `op`."""
    gather = op == "gather"
    if provider == "naive":
        return _naive_gather if gather else _naive_topk
    if provider == "chunked":
        return _chunked_gather if gather else _chunked_topk
    if provider == "compiled":
        return _compiled_fn(op)
    if provider in ("credit", "credit_triton"):
        backend = "auto" if provider == "credit" else "triton"
        return _credit_gather(backend) if gather else _credit_topk(backend)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS + ['credit_triton']}")


def unavailable(provider: str, device: torch.device) -> str | None:
    """Why a provider cannot run here, or None."""
    if provider == "compiled" and device.type != "cuda":
        return "skipped on CPU (inductor compile time)"
    if provider == "credit_triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "needs CUDA or TRITON_INTERPRET=1"
    return None


def make_inputs(case, op, dtype, device):
    """Seeded hidden [N, d], weight [V, d] (logits of a realistic spread), upstream gradients, and for
    gather the ids to score: the top-k of a second ("student") weight, so the gathered mass is high."""
    n, d, vocab = case
    k = OPS[op]
    g = torch.Generator(device=device).manual_seed(0)  # drawn on the device: CPU draws of [V, d] cost seconds
    hidden = torch.randn(n, d, generator=g, device=device).to(dtype)
    weight = (torch.randn(vocab, d, generator=g, device=device) / d**0.5 * 4).to(dtype)
    g_logp = torch.randn(n, k, generator=g, device=device)
    g_row = torch.randn(n, generator=g, device=device)
    ids = None
    if op == "gather":
        student = (weight.float() + 0.3 * torch.randn(vocab, d, generator=g, device=device) / d**0.5).to(dtype)
        ids = torch.cat([(hidden[i:i + 4096] @ student.T).topk(k, dim=-1).indices for i in range(0, n, 4096)])
    return hidden, weight, g_logp, g_row, ids


def setup(case, op: str, provider: str, mode: str, dtype: torch.dtype, device: torch.device):
    """Inputs and a closure running one step of `provider` for `op` in `mode`; shared by timing and memory."""
    n, vocab = case[0], case[2]
    hidden, weight, g_logp, g_row, ids = make_inputs(case, op, dtype, device)
    arg = ids if op == "gather" else OPS[op]
    if mode == "fwd":
        if provider == "matmul":
            return lambda: hidden @ weight.T
        fn = provider_fn(op, provider)

        def run():
            with torch.no_grad():
                return fn(hidden, weight, arg)

        return run
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    if provider == "matmul":
        g_logits = torch.randn(n, vocab, device=device, dtype=dtype)

        def run():
            h.grad = w.grad = None
            (h @ w.T).backward(g_logits)
            return h.grad, w.grad

        return run
    fn = provider_fn(op, provider)

    def run():
        h.grad = w.grad = None
        out = fn(h, w, arg)
        if op == "gather":
            logp, tail = out
            loss = (g_logp * logp.float()).sum() + (g_row * tail.float()).sum()
        else:
            logp = out[1]
            loss = (g_logp * logp.float()).sum()
        loss.backward()
        return out, h.grad, w.grad

    return run


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def reference(case, op, dtype, device, grads):
    """fp32 reference outputs (and with `grads`, gradients; autograd keeps every chunk's logits) from the
    same (rounded) inputs. Top-k: (ids, logp, dh, dw); gather: (logp, tail, dh, dw)."""
    hidden, weight, g_logp, g_row, ids = make_inputs(case, op, dtype, device)
    h = hidden.float().requires_grad_(grads)
    w = weight.float().requires_grad_(grads)
    if op == "gather":
        logp, tail = linear_gather_ref(h, w, ids, chunk_rows=1024)
        if grads:
            ((g_logp * logp).sum() + (g_row * tail).sum()).backward()
        return logp.detach(), tail.detach(), h.grad, w.grad
    top_ids, logp, _ = linear_topk_ref(h, w, OPS[op], chunk_rows=1024)
    if grads:
        (g_logp * logp).sum().backward()
    return top_ids, logp.detach(), h.grad, w.grad


def _errors(op, mode, out, ref) -> dict:
    res = out if mode == "fwd" else out[0]
    errs = {}
    if op == "gather":
        logp, tail = res
        errs["max_abs_err_logp"] = (logp.float() - ref[0]).abs().max().item()
        errs["max_abs_err_tail"] = (tail.float() - ref[1]).abs().max().item()  # nan/inf: the naive tail failed
    else:
        ids, logp = res
        errs["max_abs_err_logp"] = (logp.float() - ref[1]).abs().max().item()  # by rank
        errs["ids_match"] = (ids == ref[0]).float().mean().item()
    if mode == "fwdbwd" and ref[2] is not None:
        errs["rel_err_dhidden"] = _rel(out[1], ref[2])
        errs["rel_err_dweight"] = _rel(out[2], ref[3])
    return errs


def run_case(case, op, providers, modes, dtype, device, check_errors=True):
    n, d, vocab = case
    flops = 2 * n * d * vocab
    ref = None
    if check_errors:
        try:
            ref = reference(case, op, dtype, device, grads="fwdbwd" in modes)
        except torch.OutOfMemoryError:
            print(f"  {op:8s} reference out of memory: no error columns for this shape")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rows = []
    for mode in modes:
        for provider in providers:
            row = {"shape": f"{op} {n}x{d}x{vocab}", "op": op, "k": OPS[op], "N": n, "d": d, "V": vocab,
                   "dtype": str(dtype).replace("torch.", ""), "provider": provider, "mode": mode}
            reason = unavailable(provider, device)
            if reason:
                rows.append({**row, "skipped": reason})
                print(f"  {op:8s} {mode:7s} {provider:14s} skipped: {reason}")
                continue
            rows.append(measure(
                row, lambda: setup(case, op, provider, mode, dtype, device), device,
                work_flops=flops * (1 if mode == "fwd" else 3),
                errors=(lambda out, mode=mode: _errors(op, mode, out, ref)) if ref is not None and provider != "matmul"
                else None,
                label=f"{op:8s} {mode:7s} {provider:14s}",
            ))
    add_floor_ratios(rows)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_logit_arguments(p, name="topk", providers=PROVIDERS,
                        providers_help=f"comma list from {PROVIDERS + ['credit_triton']}")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list from {list(OPS)}")
    args = p.parse_args(argv)

    device, shape_set, cases, dtype = logit_run(args)
    if shape_set == "smoke" and device.type == "cpu":
        # tiny ops: OpenMP spin-waits on busy shared cores turn each call into ~8 ms scheduler slices
        # (measured 2-core CI box: 67 s -> 5 s for the smoke run); its timings are not claims anyway
        torch.set_num_threads(1)
    modes = args.modes.split(",")
    ops = args.ops.split(",")
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        p.error(f"unknown op(s) {unknown}; choose from {list(OPS)}")
    providers = args.providers.split(",")
    meta = machine_info(device)
    meta.update(bench="topk", shape_set=shape_set)
    out = args.out or results_path(meta, "topk")

    results = []
    for case in cases:
        print(f"N={case[0]} d={case[1]} V={case[2]} {dtype} on {meta['card']}")
        case_modes = logit_case_modes(modes, case, device, shape_set)
        for op in ops:
            results += run_case(case, op, providers, case_modes, dtype, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    write_json(out, meta, results)
    if not args.no_plot:
        plot_results(out, out.replace(".json", ".png"), title="linear_topk / linear_gather")
    return results


if __name__ == "__main__":
    main()
