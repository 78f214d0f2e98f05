"""torch.autocast: one policy for every op and backend, forward and backward (issue 9, section 2; docs/kernels.md).

linear_logprob / linear_topk / linear_gather behave as F.linear followed by an fp32 softmax under autocast: the
matmul runs in the autocast dtype (hidden and weight are cast to it), the softmax accumulates in fp32, outputs are
fp32, and gradients come back in each input's own dtype. tree_attention behaves as scaled_dot_product_attention
(q, k, v cast to the autocast dtype, output in it, lse fp32). credit_reward ignores autocast (fp32 math on the
inputs as given). Outside autocast every op computes from the tensors as given.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from credit_kernels import (
    build_prefix_trie,
    credit_reward,
    linear_gather,
    linear_logprob,
    linear_topk,
    tree_attention,
)
from credit_kernels._ext import HAS_EXT
from credit_kernels.reference import linear_gather_ref, linear_logprob_ref
from tests.utils import HAS_TRITON, INTERPRET, TRITON_DEVICE, assert_close_verbose

CPU_BACKENDS = ["torch"] + (["cpp"] if HAS_EXT else []) + (["triton"] if HAS_TRITON and INTERPRET else [])
HAS_FLEX = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
TREE_BACKENDS = ["torch"] + (["flex"] if HAS_FLEX else []) + (["triton"] if TRITON_DEVICE == "cpu" else [])
DTYPES = [torch.bfloat16, torch.float16]
N, D, V, K = 13, 32, 700, 6


def _inputs(device="cpu"):
    hidden = torch.randn(N, D, device=device)
    weight = torch.randn(V, D, device=device) / D**0.5 * 4
    targets = torch.randint(0, V, (N,), device=device)
    targets[3] = -100
    ids = torch.randint(0, V, (N, K), device=device)
    return hidden, weight, targets, ids


def _call(op, hidden, weight, targets, ids, backend):
    """The op's float outputs as a list."""
    if op == "linear_logprob":
        return list(linear_logprob(hidden, weight, targets, temperature=0.9, return_entropy=True, return_lse=True,
                                   backend=backend))
    if op == "linear_topk":
        out = linear_topk(hidden, weight, K, temperature=0.9, backend=backend)
        return [out.logp, out.lse, out.ids]
    out = linear_gather(hidden, weight, ids, temperature=0.9, backend=backend)
    return [out.logp, out.tail]


def _loss(outputs, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outputs if o.is_floating_point())


def _materialised(op, hidden, weight, targets, ids, device_type, dtype):
    """The same-dtype materialised path under autocast: F.linear (autocast dtype), then an fp32 softmax."""
    with torch.autocast(device_type, dtype=dtype):
        logits = F.linear(hidden, weight)
    assert logits.dtype == dtype
    z = logits.float() / 0.9
    logp_all = z.log_softmax(-1)
    if op == "linear_logprob":
        keep = targets != -100
        zero = torch.zeros((), device=z.device)
        logp = torch.where(keep, logp_all.gather(-1, targets.clamp(min=0)[:, None])[:, 0], zero)
        ent = torch.where(keep, -(logp_all.exp() * logp_all).sum(-1), zero)
        return [logp, ent, torch.where(keep, z.logsumexp(-1), zero)]
    if op == "linear_topk":
        top = logp_all.topk(K, dim=-1)
        return [top.values, z.logsumexp(-1), top.indices]
    rest = z.masked_fill(torch.zeros_like(z, dtype=torch.bool).scatter_(-1, ids, True), float("-inf"))
    return [logp_all.gather(-1, ids), rest.logsumexp(-1) - z.logsumexp(-1)]


def _exact(op, hidden, weight, targets, ids):
    """fp64 truth from the inputs rounded as autocast rounds them (ids: the given ones; top-k: by value)."""
    h, w = hidden.double(), weight.double()
    if op == "linear_logprob":
        return list(linear_logprob_ref(h, w, targets, temperature=0.9, return_entropy=True, return_lse=True))
    if op == "linear_topk":
        z = (h @ w.T) / 0.9
        lse = z.logsumexp(-1)
        return [(z - lse[:, None]).topk(K, dim=-1).values, lse]
    return list(linear_gather_ref(h, w, ids, temperature=0.9))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["linear_logprob", "linear_topk", "linear_gather"])
def test_linear_ops_under_cpu_autocast(op, dtype, backend):
    hidden, weight, targets, ids = _inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        outs = _call(op, h, w, targets, ids, backend)
        loss = _loss(outs)
    assert all(o.dtype == torch.float32 for o in outs if o.is_floating_point()), [o.dtype for o in outs]
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32  # each input's own dtype

    # 1. exactly the op on the inputs cast to the autocast dtype (the matmul runs in it), outside autocast
    hc, wc = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    ref = _call(op, hc, wc, targets, ids, backend)
    _loss(ref).backward()
    for i, (a, b) in enumerate(zip(outs, ref)):
        assert torch.equal(a, b), f"output {i}: max |err| {(a.double() - b.double()).abs().max()}"
    assert torch.equal(h.grad, hc.grad.float()) and torch.equal(w.grad, wc.grad.float())

    # 2. no further from fp64 than the materialised path under autocast (F.linear in dtype, fp32 softmax)
    hr, wr = hidden.to(dtype), weight.to(dtype)
    truth = _exact(op, hr, wr, targets, ids)
    naive = _materialised(op, hidden, weight, targets, ids, "cpu", dtype)
    for i, (ours, base, exact) in enumerate(zip(outs, naive, truth)):
        if not exact.is_floating_point():
            continue
        err = (ours.double() - exact).abs().max().item()
        bar = (base.double() - exact).abs().max().item()
        assert err <= 2 * bar + 1e-5, f"output {i}: ours {err:.3g} vs materialised {bar:.3g}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_inside_autocast_and_mixed_dtypes(backend):
    hidden, weight, targets, _ = _inputs()
    # backward called inside the autocast region gives the same gradients as outside it
    grads = []
    for inside in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(_call("linear_logprob", h, w, targets, None, backend))
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append((h.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    # as F.linear does, autocast accepts operands of different float dtypes: both run in the autocast dtype
    w16 = weight.to(torch.bfloat16).requires_grad_()
    h = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = linear_logprob(h, w16, targets, backend=backend)
    assert torch.equal(mixed, linear_logprob(hidden.bfloat16(), weight.bfloat16(), targets, backend=backend))
    mixed.sum().backward()
    assert h.grad.dtype == torch.float32 and w16.grad.dtype == torch.bfloat16
    # outside autocast, mixed dtypes are an error that names both, as before
    with pytest.raises(TypeError, match="hidden and weight must share a dtype"):
        linear_logprob(hidden, w16, targets, backend=backend)


def test_autocast_under_torch_compile():
    hidden, weight, targets, ids = _inputs()
    backend = "cpp" if HAS_EXT else "torch"

    g_logp, g_ent, g_lse, g_tail = torch.randn(4, N).unbind(0)
    g_ids = torch.randn(N, K)

    def loss_fn(h, w):
        logp, ent, lse = _call("linear_logprob", h, w, targets, ids, backend)
        logp_ids, tail = _call("linear_gather", h, w, targets, ids, backend)
        return ((logp * g_logp).sum() + (ent * g_ent).sum() + (lse * g_lse).sum() + (logp_ids * g_ids).sum()
                + (tail * g_tail).sum())

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l1, l2 = compiled(h1, w1), loss_fn(h2, w2)
    assert torch.equal(l1, l2)
    l1.backward()
    l2.backward()
    assert torch.equal(h1.grad, h2.grad) and torch.equal(w1.grad, w2.grad)


# ---------------------------------------------------------------------------------------------------------------------
# tree_attention: as scaled_dot_product_attention; credit_reward: autocast does not apply
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", TREE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tree_attention_under_cpu_autocast(backend, dtype):
    trie = build_prefix_trie([[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8], [1, 2, 9], [4, 4, 4]])
    u = trie.num_unique
    q, k, v = torch.randn(u, 4, 16), torch.randn(u, 2, 16), torch.randn(u, 2, 16)
    # the behaviour it copies: SDPA under CPU autocast runs in, and returns, the autocast dtype
    with torch.autocast("cpu", dtype=dtype):
        sdpa = F.scaled_dot_product_attention(q.transpose(0, 1)[None], q.transpose(0, 1)[None], q.transpose(0, 1)[None])
    assert sdpa.dtype == dtype
    grads = backend == "torch"  # flex has no CPU backward; the Triton op's backward is tested where it exists
    qg, kg, vg = (x.clone().requires_grad_(grads) for x in (q, k, v))
    with torch.autocast("cpu", dtype=dtype):
        out, lse = tree_attention(qg, kg, vg, trie, backend=backend)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = tree_attention(q.to(dtype), k.to(dtype), v.to(dtype), trie, backend=backend)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    if grads:
        (out.float().sum() + lse.sum()).backward()
        assert qg.grad.dtype == kg.grad.dtype == vg.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_credit_reward_ignores_autocast(backend, dtype):
    b, t, m = 5, 41, 3
    a, sh, s = -12 * torch.rand(b, t), -12 * torch.rand(m, b, t), (-12 * torch.rand(b, t)).bfloat16()
    mask = torch.rand(b, t) < 0.7
    expected = credit_reward(a, sh, s, mask, lam=0.4, backend=backend)
    with torch.autocast("cpu", dtype=dtype):
        got = credit_reward(a, sh, s, mask, lam=0.4, backend=backend)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32 and torch.equal(g, e)


# ---------------------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["linear_logprob", "linear_topk", "linear_gather"])
def test_linear_ops_under_cuda_autocast(op, dtype):
    hidden, weight, targets, ids = _inputs("cuda")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        outs = _call(op, h, w, targets, ids, "triton")
        loss = _loss(outs)
    loss.backward()
    assert all(o.dtype == torch.float32 for o in outs if o.is_floating_point())
    assert h.grad.dtype == w.grad.dtype == torch.float32
    hc, wc = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    ref = _call(op, hc, wc, targets, ids, "triton")
    _loss(ref).backward()
    for a, b in zip(outs, ref):
        assert torch.equal(a, b)
    assert_close_verbose(h.grad, hc.grad.float(), atol=0.0)
    truth = _exact(op, hidden.to(dtype), weight.to(dtype), targets, ids)
    naive = _materialised(op, hidden, weight, targets, ids, "cuda", dtype)
    for i, (ours, base, exact) in enumerate(zip(outs, naive, truth)):
        if exact.is_floating_point():
            err = (ours.double() - exact).abs().max().item()
            bar = (base.double() - exact).abs().max().item()
            assert err <= 2 * bar + 1e-5, f"output {i}: ours {err:.3g} vs materialised {bar:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_tree_attention_under_cuda_autocast(dtype):
    trie = build_prefix_trie([[1, 2, 3, 4, 5, 6] * 20, [1, 2, 3, 7, 8] * 30, [4, 4, 4]])
    u = trie.num_unique
    q, k, v = (torch.randn(u, h, 64, device="cuda") for h in (4, 2, 2))
    with torch.autocast("cuda", dtype=dtype):
        out, lse = tree_attention(q, k, v, trie, backend="triton")
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = tree_attention(q.to(dtype), k.to(dtype), v.to(dtype), trie, backend="triton")
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    tree = SimpleNamespace(visible_end=trie.visible_end)
    assert torch.equal(tree_attention(q.to(dtype), k.to(dtype), v.to(dtype), tree, backend="triton").out, ref_out)
