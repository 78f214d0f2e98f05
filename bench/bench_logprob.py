"""Gathered log-softmax from hidden states: ours vs the peers, side by side in one process.

    python bench/bench_logprob.py                       # GPU: the bench/shapes.py shapes, bf16
    python bench/bench_logprob.py --shapes cpu          # CPU: small shapes
    python bench/bench_logprob.py --smoke --out /tmp/logprob.json   # CI: tiny shapes, seconds

Modes: "fwd" (no grad) and "fwdbwd" (forward + backward of -(adv * logp).sum() w.r.t. hidden and
weight). Providers: matmul (the floor: h @ W.T; in fwdbwd the same matmul with its 2 backward matmuls),
naive, chunked (4096-row chunks), compiled (torch.compile of chunked), torch_lce
(F.linear_cross_entropy, torch >= 2.13), liger, cce, and ours (credit). Reports median ms (p20/p80),
TFLOP/s (2NdV per matmul), peak extra MiB (CUDA), max |logp error| and gradient relative error vs an
fp32 reference computed from the same inputs. Writes JSON (card, versions, commit) and a PNG.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

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
from credit_kernels import linear_logprob, linear_logprob_ref  # noqa: E402

PROVIDERS = ["matmul", "naive", "chunked", "compiled", "torch_lce", "liger", "cce", "credit"]


def _naive(h, w, t):
    logits = (h @ w.T).float()
    return logits.log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)


def _chunked(h, w, t):
    return linear_logprob_ref(h, w, t, upcast=False, chunk_rows=4096)


_compiled_chunked = None


def _compiled(h, w, t):
    global _compiled_chunked
    if _compiled_chunked is None:
        _compiled_chunked = torch.compile(_chunked, dynamic=False)
    return _compiled_chunked(h, w, t)


def _liger(h, w, t):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    loss = liger_fused_linear_cross_entropy(h, w, t, reduction="none")
    return -(loss[0] if isinstance(loss, tuple) else loss)


def _cce(h, w, t):
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(h, w, t, reduction="none")


def _torch_lce(h, w, t):
    return -F.linear_cross_entropy(h, w, t, reduction="none")


LOGPROB_FNS = {
    "naive": _naive,
    "chunked": _chunked,
    "compiled": _compiled,
    "torch_lce": _torch_lce,
    "liger": _liger,
    "cce": _cce,
    "credit": lambda h, w, t: linear_logprob(h, w, t, check_inputs=False),
    "credit_triton": lambda h, w, t: linear_logprob(h, w, t, backend="triton", check_inputs=False),
}


def unavailable(provider: str, device: torch.device) -> str | None:
    """Why a provider cannot run here, or None."""
    if provider in ("liger", "cce"):
        mod = "liger_kernel" if provider == "liger" else "cut_cross_entropy"
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} not installed"
        if device.type != "cuda":
            return "needs CUDA"
    if provider == "torch_lce" and not hasattr(F, "linear_cross_entropy"):
        return "torch has no F.linear_cross_entropy"
    if provider == "compiled" and device.type != "cuda":
        return "skipped on CPU (inductor compile time)"
    return None


def make_inputs(case, dtype, device):
    """Seeded hidden [N, d], weight [V, d] (logits of a realistic spread), targets [N], advantages [N]."""
    n, d, vocab = case
    # drawn on the device: a CPU draw of a 151936 x 3584 weight costs seconds per provider
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, d, generator=g, device=device).to(dtype)
    weight = (torch.randn(vocab, d, generator=g, device=device) / d**0.5 * 4).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g, device=device)
    adv = torch.randn(n, generator=g, device=device)
    return hidden, weight, targets, adv


def setup(case: tuple[int, int, int], provider: str, mode: str, dtype: torch.dtype, device: torch.device):
    """Inputs and a closure running one step of `provider` in `mode`; shared by the timing and memory runs."""
    n, vocab = case[0], case[2]
    hidden, weight, targets, adv = make_inputs(case, dtype, device)
    if mode == "fwd":
        if provider == "matmul":
            return lambda: hidden @ weight.T
        fn = LOGPROB_FNS[provider]

        def run():
            with torch.no_grad():
                return fn(hidden, weight, targets)

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
    fn = LOGPROB_FNS[provider]

    def run():
        h.grad = w.grad = None
        logp = fn(h, w, targets)
        (-(adv * logp.float()).sum()).backward()
        return logp, h.grad, w.grad

    return run


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def reference(case, dtype, device, backward=True):
    """fp32 reference logp and gradients of -(adv * logp).sum() from the same (rounded) inputs."""
    hidden, weight, targets, adv = make_inputs(case, dtype, device)
    h = hidden.float().requires_grad_(backward)
    w = weight.float().requires_grad_(backward)
    logp = linear_logprob_ref(h, w, targets, chunk_rows=1024)
    if not backward:
        return logp.detach(), None, None
    (-(adv * logp).sum()).backward()
    return logp.detach(), h.grad, w.grad


def run_case(case, providers, modes, dtype, device, check_errors=True):
    n, d, vocab = case
    flops = 2 * n * d * vocab
    ref = reference(case, dtype, device, backward="fwdbwd" in modes) if check_errors else None
    rows = []
    for mode in modes:
        for provider in providers:
            row = {"shape": f"{n}x{d}x{vocab}", "N": n, "d": d, "V": vocab, "dtype": str(dtype).replace("torch.", ""),
                   "provider": provider, "mode": mode}
            reason = unavailable(provider, device)
            if reason:
                rows.append({**row, "skipped": reason})
                print(f"  {mode:7s} {provider:14s} skipped: {reason}")
                continue
            def errors(out, mode=mode):
                if ref is None or provider == "matmul":
                    return {}
                logp = out if mode == "fwd" else out[0]
                errs = {"max_abs_err_logp": (logp.float() - ref[0]).abs().max().item()}
                if mode == "fwdbwd":
                    errs.update(rel_err_dhidden=_rel(out[1], ref[1]), rel_err_dweight=_rel(out[2], ref[2]))
                return errs

            rows.append(measure(row, lambda: setup(case, provider, mode, dtype, device), device,
                                work_flops=flops * (1 if mode == "fwd" else 3), errors=errors,
                                label=f"{mode:7s} {provider:14s}"))
    add_floor_ratios(rows)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_logit_arguments(p, name="logprob", providers=PROVIDERS,
                        providers_help=f"comma list from {sorted(LOGPROB_FNS)} + matmul")
    args = p.parse_args(argv)

    device, shape_set, cases, dtype = logit_run(args)
    modes = args.modes.split(",")
    providers = args.providers.split(",")
    meta = machine_info(device)
    meta.update(bench="logprob", shape_set=shape_set)
    out = args.out or results_path(meta, "logprob")

    results = []
    for case in cases:
        print(f"N={case[0]} d={case[1]} V={case[2]} {dtype} on {meta['card']}")
        results += run_case(case, providers, logit_case_modes(modes, case, device, shape_set), dtype, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_json(out, meta, results)
    if not args.no_plot:
        plot_results(out, out.replace(".json", ".png"), title="linear_logprob")
    return results


if __name__ == "__main__":
    main()
