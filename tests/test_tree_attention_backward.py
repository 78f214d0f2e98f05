"""tree_attention gradients (q, k, v, through out and lse) against an fp64 oracle: the dense ancestry mask of
tests/test_tree_attention.py and autograd, on every backend. Low precision must stay within 2x the error of the
same-dtype PyTorch reference plus a small atol (flash-attention's rule). NaN planted in rows whose tiles the
plan skips proves the backward never reads them."""

from __future__ import annotations

import importlib
import importlib.util
import random
from types import SimpleNamespace

import pytest
import torch

from credit_kernels.prefix_trie import build_prefix_trie
from credit_kernels.tree_attention import (
    FLEX_BLOCK,
    _build_plan,
    tree_attention,
    tree_attention_plan,
    tree_attention_ref,
)
from credit_kernels.tree_attention_bwd import _tree_attention_bwd_torch
from tests.test_tree_attention import _oracle, _oracle_mask
from tests.utils import TRITON_DEVICE, VIEW_KINDS, assert_close_verbose, make_view

needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="needs CUDA or TRITON_INTERPRET=1")
HAS_FLEX = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
needs_flex = pytest.mark.skipif(not HAS_FLEX, reason="torch has no flex_attention")
_ta = importlib.import_module("credit_kernels.tree_attention")  # the module (the package re-exports the function)


# ---------------------------------------------------------------------------------------------------------------------
# tries (U ~ 60-200: the interpreter costs ~5 ms per program and loop step)
# ---------------------------------------------------------------------------------------------------------------------
def _shared_prompts():
    """3 prompts, each under 3-4 responses of mixed lengths."""
    rng = random.Random(0)
    seqs = []
    for p in range(3):
        prompt = [100 + p] + [rng.randrange(50) for _ in range(rng.randint(18, 37))]
        seqs += [prompt + [200 + r] + [rng.randrange(50) for _ in range(rng.randint(2, 20))] for r in range(3 + p % 2)]
    return build_prefix_trie(seqs)


def _prefix_of_another():
    """A sequence that is a prefix of another (it ends where the longer one goes on), and an unrelated one."""
    base = list(range(1, 41))
    return build_prefix_trie([base, base + list(range(60, 93)), [7] * 25, base[:17]])


def _one_token_nodes():
    """Binary sequences of length <= 7: a trie of one-token nodes mostly (35 of 56 nodes, U = 89)."""
    rng = random.Random(3)
    return build_prefix_trie([[rng.randrange(2) for _ in range(rng.randint(1, 7))] for _ in range(100)])


TRIES = {"shared": _shared_prompts, "prefix": _prefix_of_another, "one_token": _one_token_nodes}
SMALL_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def _inputs(tree, hq, hkv, d, dtype, device="cpu"):
    """q, k, v (leaf tensors, rounded to dtype) and the random upstream gradients (g_out in dtype, g_lse fp32)."""
    u = tree.visible_end.numel()
    q, k, v = (torch.randn(u, h, d).to(device=device, dtype=dtype).requires_grad_() for h in (hq, hkv, hkv))
    return q, k, v, torch.randn(u, hq, d).to(device=device, dtype=dtype), torch.randn(u, hq, device=device)


def _grads(out, lse, leaves, g_out, g_lse):
    """Gradients of <out, g_out> + <lse, g_lse>; either output may be left out (its gradient None)."""
    loss = 0.0
    if g_out is not None:
        loss = loss + (out.float() * g_out.float()).sum()
    if g_lse is not None:
        loss = loss + (lse.float() * g_lse.float()).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # lse alone does not depend on v
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def _expected(q, k, v, tree, g_out, g_lse, scale):
    """fp64 oracle gradients on the same (rounded) inputs."""
    leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    eo, el = _oracle(*leaves, _oracle_mask(tree), scale)
    go = None if g_out is None else g_out.cpu().double()
    gl = None if g_lse is None else g_lse.cpu().double()
    return _grads(eo, el, leaves, go, gl)


def _check_grads(got, q, k, v, tree, g_out, g_lse, *, scale=None):
    """Each of dq, dk, dv within 2x the same-dtype torch reference's error (vs fp64) plus a small atol."""
    expected = _expected(q, k, v, tree, g_out, g_lse, scale)
    leaves = [x.detach().cpu().requires_grad_() for x in (q, k, v)]
    ro, rl = tree_attention_ref(*leaves, tree.visible_end, scale=scale, upcast=False)
    ref = _grads(ro, rl, leaves, None if g_out is None else g_out.cpu(), None if g_lse is None else g_lse.cpu())
    atol = {n: 2 * float((r.double() - e).abs().max()) + SMALL_ATOL[q.dtype] for n, r, e in zip("qkv", ref, expected)}
    for n, a, e, x in zip("qkv", got, expected, (q, k, v)):
        assert a.dtype == x.dtype and a.shape == x.shape
        assert_close_verbose(a, e, atol=atol[n], name=f"d{n}")


# ---------------------------------------------------------------------------------------------------------------------
# the plan's transposed CSR: exactly the query blocks that see each KV block
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bm,bn", [(16, 16), (16, 32), (32, 16), (64, 64)])
@pytest.mark.parametrize("name", list(TRIES))
def test_plan_transpose_lists_exactly_the_query_blocks(name, bm, bn):
    tree = TRIES[name]()
    u = tree.visible_end.numel()
    plan = _build_plan(tree.visible_end, bm, bn)
    mask = _oracle_mask(tree)
    n_m, n_n = -(-u // bm), -(-u // bn)
    ptr, idx = plan.q_block_ptr.tolist(), plan.q_block_idx.tolist()
    assert len(ptr) == n_n + 1 and ptr[-1] == len(idx) == plan.block_idx.numel()
    assert plan.q_block_ptr.dtype == plan.q_block_idx.dtype == torch.int32
    for b in range(n_n):
        needed = [m for m in range(n_m) if mask[m * bm:(m + 1) * bm, b * bn:(b + 1) * bn].any()]
        assert idx[ptr[b]:ptr[b + 1]] == needed, f"kv block {b}"


def test_empty_plan_has_both_csrs():
    plan = tree_attention_plan(SimpleNamespace(visible_end=torch.zeros(0, dtype=torch.int32)))
    assert plan.q_block_ptr.tolist() == [0] and plan.q_block_idx.numel() == 0 and plan.flex_block_mask is None


# ---------------------------------------------------------------------------------------------------------------------
# Triton backward (interpreted on CPU: small shapes)
# ---------------------------------------------------------------------------------------------------------------------
TRITON_CASES = [
    ("shared", 4, 1, 16, torch.float32, 16),  # GQA 4:1, 16-row tiles: many skipped and partial tiles
    ("prefix", 2, 1, 32, torch.float32, 64),  # 2:1
    ("one_token", 2, 2, 16, torch.float32, 16),  # 1:1
    ("shared", 2, 2, 128, torch.float32, 64),
    ("shared", 4, 2, 64, torch.bfloat16, 64),
    ("one_token", 4, 1, 32, torch.bfloat16, 16),
    ("prefix", 2, 2, 128, torch.float16, 64),
    ("prefix", 4, 1, 64, torch.float16, 16),
]


@needs_triton
@pytest.mark.parametrize("name,hq,hkv,d,dtype,block", TRITON_CASES)
def test_triton_gradients_match_oracle(name, hq, hkv, d, dtype, block):
    tree = TRIES[name]()
    q, k, v, g_out, g_lse = _inputs(tree, hq, hkv, d, dtype, TRITON_DEVICE)
    plan = _build_plan(tree.visible_end.to(TRITON_DEVICE), block, block)
    out, lse = tree_attention(q, k, v, plan, backend="triton", scale=0.3)
    _check_grads(_grads(out, lse, (q, k, v), g_out, g_lse), q, k, v, tree, g_out, g_lse, scale=0.3)


@needs_triton
@pytest.mark.parametrize("which", ["out", "lse"])
def test_triton_gradient_of_one_output(which):
    """Only out used (lse's gradient None) or only lse (out's gradient None): both reach the kernels right."""
    tree = TRIES["prefix"]()
    q, k, v, g_out, g_lse = _inputs(tree, 2, 1, 16, torch.float32, TRITON_DEVICE)
    out, lse = tree_attention(q, k, v, _build_plan(tree.visible_end.to(TRITON_DEVICE), 16, 16), backend="triton")
    g_out, g_lse = (g_out, None) if which == "out" else (None, g_lse)
    _check_grads(_grads(out, lse, (q, k, v), g_out, g_lse), q, k, v, tree, g_out, g_lse)


@needs_triton
@pytest.mark.parametrize("wanted", ["q", "kv"])
def test_triton_only_the_needed_gradients(wanted):
    """dq alone runs only the dq kernel, dk/dv alone only the dk/dv kernel; the values do not change."""
    tree = TRIES["one_token"]()
    q, k, v, g_out, g_lse = _inputs(tree, 4, 2, 16, torch.float32, TRITON_DEVICE)
    plan = tree_attention_plan(tree, device=TRITON_DEVICE)
    full = dict(zip("qkv", _grads(*tree_attention(q, k, v, plan, backend="triton"), (q, k, v), g_out, g_lse)))
    x = {n: t.detach().requires_grad_(n in wanted) for n, t in zip("qkv", (q, k, v))}
    part = _grads(*tree_attention(*x.values(), plan, backend="triton"), [x[n] for n in wanted], g_out, g_lse)
    for n, a in zip(wanted, part):
        assert torch.equal(a, full[n]), f"d{n}"


@needs_triton
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over the NaN rows
def test_triton_backward_never_reads_skipped_blocks():
    """Prompt P (32 rows) with responses A and B (32 rows each), 16-row tiles. NaN in A's q, k, v and in its
    upstream gradients: B never meets A (no B query sees an A key, no A query sees a B key), so if no skipped
    tile is loaded B's gradients and P's dq stay finite and exact; a loaded, masked NaN would poison them."""
    tree = build_prefix_trie([[1] + [2] * 31 + [3] + [4] * 31, [1] + [2] * 31 + [5] + [6] * 31])
    u = tree.visible_end.numel()
    assert u == 96 and tree.visible_end[32:64].tolist() == [64] * 32  # A: rows 32..63, B: rows 64..95
    q, k, v, g_out, g_lse = _inputs(tree, 2, 1, 16, torch.float32, TRITON_DEVICE)
    with torch.no_grad():
        for x in (q, k, v, g_out, g_lse):
            x[32:64] = float("nan")
    plan = _build_plan(tree.visible_end.to(TRITON_DEVICE), 16, 16)
    dq, dk, dv = (g.cpu() for g in _grads(*tree_attention(q, k, v, plan, backend="triton"), (q, k, v), g_out, g_lse))
    assert torch.isnan(dq[32:64]).all() and torch.isnan(dk[:32]).all()  # the NaN did reach what A feeds
    # B with P as its prefix, without A: the oracle on the 64 rows P + B
    rows = torch.cat([torch.arange(32), torch.arange(64, 96)])
    sub = build_prefix_trie([[1] + [2] * 31 + [5] + [6] * 31])
    eq, ek, ev = _expected(q[rows], k[rows], v[rows], sub, g_out[rows], g_lse[rows], None)
    assert_close_verbose(dq[:32], eq[:32], atol=1e-5, name="dq P")
    assert_close_verbose(dq[64:], eq[32:], atol=1e-5, name="dq B")
    assert_close_verbose(dk[64:], ek[32:], atol=1e-5, name="dk B")
    assert_close_verbose(dv[64:], ev[32:], atol=1e-5, name="dv B")


@needs_triton
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over the NaN rows
def test_triton_backward_never_reads_skipped_blocks_of_another_sequence():
    """Two unrelated sequences; NaN everywhere in the first (inputs and upstream gradients)."""
    tree = build_prefix_trie([[1] + [2] * 31, [3] + [4] * 40])
    q, k, v, g_out, g_lse = _inputs(tree, 4, 2, 16, torch.float32, TRITON_DEVICE)
    with torch.no_grad():
        for x in (q, k, v, g_out, g_lse):
            x[:32] = float("nan")
    plan = _build_plan(tree.visible_end.to(TRITON_DEVICE), 16, 16)
    got = _grads(*tree_attention(q, k, v, plan, backend="triton"), (q, k, v), g_out, g_lse)
    sub = build_prefix_trie([[3] + [4] * 40])
    expected = _expected(q[32:], k[32:], v[32:], sub, g_out[32:], g_lse[32:], None)
    for n, a, e in zip("qkv", got, expected):
        assert torch.isnan(a[:32].cpu()).all()
        assert_close_verbose(a[32:].cpu(), e, atol=1e-5, name=f"d{n}")


@needs_triton
def test_triton_gradients_of_views_equal_contiguous():
    """The scorer's x[0].transpose(0, 1) views, head slices of a fused qkv, and a last-dim stride of 2 all give
    the gradients of contiguous copies; an expanded (stride 0) upstream gradient from .sum() works too."""
    tree = TRIES["prefix"]()
    u, hq, hkv, d = tree.visible_end.numel(), 4, 2, 16
    plan = tree_attention_plan(tree, device=TRITON_DEVICE)
    g_out, g_lse = torch.randn(u, hq, d, device=TRITON_DEVICE), torch.randn(u, hq, device=TRITON_DEVICE)
    base = [torch.randn(u, h, d, device=TRITON_DEVICE) for h in (hq, hkv, hkv)]
    leaves = [x.clone().requires_grad_() for x in base]
    expected = _grads(*tree_attention(*leaves, plan, backend="triton"), leaves, g_out, g_lse)

    hf = [x.transpose(0, 1).unsqueeze(0).contiguous().requires_grad_() for x in base]  # [1, H, U, D]
    views = [x[0].transpose(0, 1) for x in hf]  # strides (D, U * D, 1)
    fused = torch.cat(base, 1).requires_grad_()  # [U, Hq + 2 Hkv, D]
    sliced = [fused[:, :hq], fused[:, hq:hq + hkv], fused[:, hq + hkv:]]
    wide = [torch.stack([x, torch.full_like(x, float("nan"))], -1).requires_grad_() for x in base]  # [U, H, D, 2]
    strided = [x[..., 0] for x in wide]  # last-dim stride 2
    for name, xs, leaves_of in (("transposed", views, hf), ("fused", sliced, [fused]), ("strided", strided, wide)):
        got = _grads(*tree_attention(*xs, plan, backend="triton"), leaves_of, g_out, g_lse)
        if name == "transposed":
            got = [g[0].transpose(0, 1) for g in got]
        elif name == "fused":
            got = torch.split(got[0], [hq, hkv, hkv], 1)
        else:
            assert all(torch.equal(g[..., 1], torch.zeros_like(g[..., 1])) for g in got)
            got = [g[..., 0] for g in got]
        for n, a, e in zip("qkv", got, expected):
            assert_close_verbose(a, e, atol=1e-6, name=f"{name} d{n}")

    x = [t.clone().requires_grad_() for t in base]
    out, lse = tree_attention(*x, plan, backend="triton")
    got = torch.autograd.grad(out.sum() + lse.sum(), x)  # .sum()'s gradient is an expanded tensor
    _check_grads(got, *x, tree, torch.ones(u, hq, d), torch.ones(u, hq))


@needs_triton
def test_triton_plan_without_transpose_still_differentiates():
    """A plan built by hand with only the forward CSR: the backward derives the transpose itself."""
    tree = TRIES["prefix"]()
    q, k, v, g_out, g_lse = _inputs(tree, 2, 1, 16, torch.float32, TRITON_DEVICE)
    full = tree_attention_plan(tree, device=TRITON_DEVICE)
    bare = _ta.TreeAttentionPlan(*full[:5])
    assert bare.q_block_ptr is None
    a = _grads(*tree_attention(q, k, v, bare, backend="triton"), (q, k, v), g_out, g_lse)
    e = _grads(*tree_attention(q, k, v, full, backend="triton"), (q, k, v), g_out, g_lse)
    assert all(torch.equal(x, y) for x, y in zip(a, e))


# ---------------------------------------------------------------------------------------------------------------------
# torch.library: opcheck, the op's CPU path, torch.compile
# ---------------------------------------------------------------------------------------------------------------------
def _op_args(tree, device, dtype=torch.float32, requires_grad=False):
    q, k, v, g_out, g_lse = _inputs(tree, 2, 1, 16, dtype, device)
    if not requires_grad:
        q, k, v = (x.detach() for x in (q, k, v))
    plan = tree_attention_plan(tree, device=device)
    return (q, k, v, plan.visible_end, plan.block_ptr, plan.block_idx, 0.25, plan.block_m, plan.block_n,
            plan.q_block_ptr, plan.q_block_idx), g_out, g_lse


@needs_triton
def test_opcheck_forward_with_autograd_and_backward_op():
    tree = TRIES["prefix"]()
    args, g_out, g_lse = _op_args(tree, TRITON_DEVICE, requires_grad=True)
    # with inputs that require grad, test_aot_dispatch_dynamic also traces and runs the registered backward
    torch.library.opcheck(torch.ops.credit.tree_attention.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))  # fmt: skip
    q, k, v = (x.detach() for x in args[:3])
    out, lse = torch.ops.credit.tree_attention(q, k, v, *args[3:])
    for dlse, needs_q, needs_kv in ((g_lse, True, True), (None, True, False), (g_lse, False, True)):
        bargs = (g_out, dlse, q, k, v, out, lse, *args[3:6], *args[9:11], *args[6:9], needs_q, needs_kv)
        torch.library.opcheck(torch.ops.credit.tree_attention_backward.default, bargs,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        dq, dk, dv = torch.ops.credit.tree_attention_backward(*bargs)
        assert dq.shape == (q.shape if needs_q else (0,)) and dk.shape == dv.shape == (k.shape if needs_kv else (0,))
    # no lse gradient (HAS_DLSE off in the kernel) is a zero lse gradient
    bargs = (g_out, None, q, k, v, out, lse, *args[3:6], *args[9:11], *args[6:9], True, True)
    none = torch.ops.credit.tree_attention_backward(*bargs)
    zero = torch.ops.credit.tree_attention_backward(g_out, torch.zeros_like(lse), *bargs[2:])
    assert all(torch.equal(a, b) for a, b in zip(none, zero))


def test_op_cpu_path_without_interpreter(monkeypatch):
    """CPU tensors with TRITON_INTERPRET unset: the op's forward is the reference and its backward the chunked
    PyTorch backward (`_tree_attention_bwd_torch`), also with only lse or only out used."""
    monkeypatch.setattr(_ta, "INTERPRET", False)  # as on a CPU machine without the interpreter: the CPU branch
    tree = TRIES["shared"]()
    args, g_out, g_lse = _op_args(tree, "cpu", requires_grad=True)
    out, lse = torch.ops.credit.tree_attention(*args)
    _check_grads(_grads(out, lse, args[:3], g_out, g_lse), *args[:3], tree, g_out, g_lse, scale=0.25)
    out, lse = torch.ops.credit.tree_attention(*args)
    _check_grads(_grads(out, lse, args[:3], None, g_lse), *args[:3], tree, None, g_lse, scale=0.25)


@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_chunked_torch_backward_matches_oracle_in_fp64(chunk_rows):
    tree = TRIES["one_token"]()
    q, k, v, g_out, g_lse = _inputs(tree, 4, 2, 16, torch.float64)
    q, k, v = (x.detach() for x in (q, k, v))
    out, lse = tree_attention_ref(q, k, v, tree.visible_end, scale=0.5)
    got = _tree_attention_bwd_torch(g_out, g_lse, q, k, v, out, lse, tree.visible_end, 0.5, chunk_rows=chunk_rows)
    for n, a, e in zip("qkv", got, _expected(q, k, v, tree, g_out, g_lse, 0.5)):
        assert_close_verbose(a, e, atol=1e-12, name=f"d{n}")


@needs_triton
def test_compile_fullgraph_forward_and_backward():
    """One graph for forward + backward (aot_eager: the custom ops are opaque, so inductor adds only compile time)."""
    tree = TRIES["prefix"]()
    q, k, v, g_out, g_lse = _inputs(tree, 4, 2, 16, torch.float32, TRITON_DEVICE)
    plan = tree_attention_plan(tree, device=TRITON_DEVICE)

    def loss(q, k, v):
        out, lse = tree_attention(q, k, v, plan, scale=0.25, backend="triton")
        return (out * g_out).sum() + (lse * g_lse).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    expected = torch.autograd.grad(loss(q, k, v), (q, k, v))
    assert all(torch.equal(a, e) for a, e in zip(got, expected))


# ---------------------------------------------------------------------------------------------------------------------
# reference backend ("torch"): autograd through the dense ops, one chunk at a time
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,hq,hkv,d,dtype", [
    ("shared", 4, 1, 16, torch.float32), ("prefix", 2, 1, 64, torch.float32), ("one_token", 2, 2, 128, torch.float32),
    ("shared", 4, 2, 32, torch.bfloat16), ("prefix", 2, 2, 128, torch.float16),
])  # fmt: skip
def test_torch_backend_gradients_match_oracle(name, hq, hkv, d, dtype):
    tree = TRIES[name]()
    q, k, v, g_out, g_lse = _inputs(tree, hq, hkv, d, dtype)
    out, lse = tree_attention(q, k, v, tree, backend="torch", scale=0.3)
    _check_grads(_grads(out, lse, (q, k, v), g_out, g_lse), q, k, v, tree, g_out, g_lse, scale=0.3)


@pytest.mark.parametrize("name,hq,hkv,d,dtype", [
    ("shared", 4, 1, 16, torch.float32), ("prefix", 2, 2, 128, torch.float16), ("one_token", 4, 2, 32, torch.bfloat16),
])  # fmt: skip
def test_torch_backend_training_on_cpu_runs_the_hand_written_backward(monkeypatch, name, hq, hkv, d, dtype):
    """Without the interpreter, CPU tensors that want gradients go through the op (reference forward, chunked
    hand-written backward) instead of autograd through checkpointed chunks; same gradients as the oracle."""
    monkeypatch.setattr(_ta, "INTERPRET", False)
    calls = []
    real = _ta._tree_attention_bwd_torch
    monkeypatch.setattr(_ta, "_tree_attention_bwd_torch", lambda *a, **k: calls.append(1) or real(*a, **k))
    tree = TRIES[name]()
    q, k, v, g_out, g_lse = _inputs(tree, hq, hkv, d, dtype)
    out, lse = tree_attention(q, k, v, tree, backend="torch", scale=0.3)
    _check_grads(_grads(out, lse, (q, k, v), g_out, g_lse), q, k, v, tree, g_out, g_lse, scale=0.3)
    assert calls, "the CPU training path did not run the hand-written backward"
    with torch.no_grad():  # inference stays on the reference itself
        same = tree_attention(q, k, v, tree, backend="torch", scale=0.3)
    assert torch.equal(same.out, out.detach()) and torch.equal(same.lse, lse.detach())


@pytest.mark.parametrize("arg", ["q", "k", "v"])
@pytest.mark.parametrize("kind", [k for k in VIEW_KINDS if k != "contiguous"])
def test_cpu_training_path_with_views_equals_contiguous(monkeypatch, arg, kind):
    """The CPU training path (the op's hand-written backward) on a view of q, k or v: the contiguous result,
    forward and backward."""
    monkeypatch.setattr(_ta, "INTERPRET", False)
    tree = TRIES["shared"]()
    q, k, v, g_out, g_lse = _inputs(tree, 4, 2, 16, torch.float32)
    base = {"q": q, "k": k, "v": v}
    view = make_view(base[arg], kind, requires_grad=True)
    if view is None:
        pytest.skip(f"{kind} does not apply to a {tuple(base[arg].shape)} tensor")
    base[arg] = view.detach()  # the view's own values (an expanded view repeats one row)
    leaves = {n: x.contiguous().requires_grad_(True) for n, x in base.items()}
    args = {**{n: x.clone().requires_grad_(True) for n, x in base.items()}, arg: view}
    want = tree_attention(leaves["q"], leaves["k"], leaves["v"], tree, backend="torch", scale=0.3)
    got = tree_attention(args["q"], args["k"], args["v"], tree, backend="torch", scale=0.3)
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)
    g_want = torch.autograd.grad((want.out * g_out).sum() + (want.lse * g_lse).sum(), list(leaves.values()))
    g_got = torch.autograd.grad((got.out * g_out).sum() + (got.lse * g_lse).sum(), [args[n] for n in "qkv"])
    for n, a, e in zip("qkv", g_got, g_want):
        assert_close_verbose(a, e, atol=1e-6, name=f"d{n} ({arg} {kind})")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_training_path_under_autocast(monkeypatch, dtype):
    """Under CPU autocast the CPU training path computes from the autocast dtype, as scaled_dot_product_attention
    does: the same output and gradients as calling it on inputs cast to that dtype; gradients in fp32 leaves' dtype."""
    monkeypatch.setattr(_ta, "INTERPRET", False)
    tree = TRIES["prefix"]()
    q, k, v, g_out, g_lse = _inputs(tree, 4, 2, 16, torch.float32)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    with torch.autocast("cpu", dtype=dtype):
        got = tree_attention(*leaves, tree, backend="torch", scale=0.3)
    assert got.out.dtype == dtype and got.lse.dtype == torch.float32
    cast = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
    want = tree_attention(*cast, tree, backend="torch", scale=0.3)
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)
    g_got = torch.autograd.grad((got.out.float() * g_out).sum() + (got.lse * g_lse).sum(), leaves)
    g_want = torch.autograd.grad((want.out.float() * g_out).sum() + (want.lse * g_lse).sum(), cast)
    for n, a, e in zip("qkv", g_got, g_want):
        assert a.dtype == torch.float32
        assert_close_verbose(a, e.float(), atol=1e-6, name=f"d{n}")


def test_reference_backward_keeps_one_chunk_not_the_attention_matrix():
    """Autograd saves only the inputs (each chunk is checkpointed), not every chunk's probabilities."""
    u, hq, d = 300, 2, 16
    ve = torch.full((u,), u)  # one causal sequence: 45150 attended pairs per head
    q, k, v = (torch.randn(u, h, d, requires_grad=True) for h in (hq, 1, 1))
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, lse = tree_attention_ref(q, k, v, ve, chunk_rows=32)
    scores_bytes = 4 * hq * u * (u + 1) // 2  # what keeping every chunk's fp32 probabilities would take
    inputs_bytes = 4 * u * (hq + 2) * d
    assert sum(storages.values()) < 2 * inputs_bytes < scores_bytes
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum() + lse.sum(), (q, k, v))
    expected = _tree_attention_bwd_torch(g, torch.ones(u, hq), q.detach(), k.detach(), v.detach(), out.detach(),
                                         lse.detach(), ve, d**-0.5)
    for n, a, e in zip("qkv", got, expected):
        assert_close_verbose(a, e, atol=1e-5, name=f"d{n}")


# ---------------------------------------------------------------------------------------------------------------------
# FlexAttention backend: the plan carries the BlockMask; torch has no CPU backward for it
# ---------------------------------------------------------------------------------------------------------------------
def test_plan_backend_argument():
    tree = TRIES["shared"]()
    assert tree_attention_plan(tree).flex_block_mask is None
    assert tree_attention_plan(tree, backend="triton").flex_block_mask is None
    with pytest.raises(ValueError, match="backend must be one of"):
        tree_attention_plan(tree, backend="cuda")
    if HAS_FLEX:
        plan = tree_attention_plan(tree, backend="flex")
        assert plan.flex_block_mask is not None and plan.flex_block_mask.seq_lengths == (plan.visible_end.numel(),) * 2
        again = tree_attention_plan(tree_attention_plan(tree), backend="flex")  # a plan gains the mask it lacks
        assert again.flex_block_mask is not None and torch.equal(again.block_idx, plan.block_idx)


@needs_flex
def test_flex_uses_the_plans_block_mask(monkeypatch):
    tree = TRIES["prefix"]()
    q, k, v, _, _ = _inputs(tree, 4, 2, 16, torch.float32)
    q, k, v = (x.detach() for x in (q, k, v))
    plan = tree_attention_plan(tree, backend="flex")

    def no_rebuild(*a, **kw):
        raise AssertionError("tree_attention rebuilt the BlockMask the plan carries")

    monkeypatch.setattr(_ta, "_flex_block_mask", no_rebuild)
    out, lse = tree_attention(q, k, v, plan, backend="flex", scale=0.4)
    ro, rl = tree_attention_ref(q, k, v, tree.visible_end, scale=0.4)
    assert_close_verbose(out, ro, atol=2e-5)
    assert_close_verbose(lse, rl, atol=2e-5)


@needs_flex
@pytest.mark.parametrize("name", list(TRIES) + ["long"])
def test_flex_block_mask_transpose_is_what_a_backward_needs(name):
    """Flex's CUDA backward walks the BlockMask's per-KV-block query lists (q_num_blocks / q_indices, and the
    full_* ones that skip mask_mod): they must list exactly the query tiles that see the KV tile, full ones
    only where every pair is visible."""
    tree = build_prefix_trie([list(range(150)) + [1000 + i] * (i + 1) for i in range(5)] + [[7] * 120]) \
        if name == "long" else TRIES[name]()
    u = tree.visible_end.numel()
    bm = tree_attention_plan(tree, backend="flex").flex_block_mask
    mask = _oracle_mask(tree)
    n, blk = -(-u // FLEX_BLOCK), FLEX_BLOCK

    def listed(num, idx, b):
        return sorted(idx[0, 0, b, : num[0, 0, b]].tolist())

    for b in range(n):
        tiles = [mask[m * blk:(m + 1) * blk, b * blk:(b + 1) * blk] for m in range(n)]
        needed = [m for m in range(n) if tiles[m].any()]
        full = [m for m in range(n) if tiles[m].all() and tiles[m].numel() == blk * blk]
        partial = listed(bm.q_num_blocks, bm.q_indices, b)
        fulls = listed(bm.full_q_num_blocks, bm.full_q_indices, b)
        assert sorted(partial + fulls) == needed, f"kv block {b}"
        assert set(fulls) <= set(full), f"kv block {b}: a tile marked full has masked pairs"


@needs_flex
def test_flex_backward_on_cpu_is_a_clear_error():
    tree = TRIES["prefix"]()
    q, k, v, _, _ = _inputs(tree, 2, 1, 16, torch.float32)
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        tree_attention(q, k, v, tree_attention_plan(tree, backend="flex"), backend="flex")
    with torch.no_grad():  # the forward still runs
        out, _ = tree_attention(q, k, v, tree, backend="flex")
    assert out.shape == q.shape


@needs_flex
def test_flex_mask_under_torchs_eager_backward(monkeypatch):
    """torch refuses flex backward on CPU only in its public wrapper: with that check lifted (test only), its
    eager backward runs our mask_mod over padded tiles (U % 128 != 0) and must give the oracle's gradients.
    The eager path ignores the block lists; the test above checks those."""
    fa = importlib.import_module("torch.nn.attention.flex_attention")
    if not hasattr(fa, "_validate_device"):
        pytest.skip("this torch has no flex _validate_device to lift")
    monkeypatch.setattr(fa, "_validate_device", lambda *a: None)
    tree = TRIES["shared"]()
    q, k, v, g_out, g_lse = _inputs(tree, 4, 2, 32, torch.float32)
    out, lse = _ta._tree_attention_flex(q, k, v, tree.visible_end, 0.3,
                                        block_mask=tree_attention_plan(tree, backend="flex").flex_block_mask)
    _check_grads(_grads(out, lse, (q, k, v), g_out, g_lse), q, k, v, tree, g_out, g_lse, scale=0.3)


# ---------------------------------------------------------------------------------------------------------------------
# GPU (compiled Triton and compiled flex; skipped without CUDA)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
class TestGPU:
    @staticmethod
    def _tree():
        seqs = [list(range(300)) + [1000 + p] * 200 + [2000 + p * 10 + r] * (50 + 37 * r)
                for p in range(4) for r in range(4)]
        return build_prefix_trie(seqs)

    @pytest.mark.parametrize("backend", ["triton", "flex"])
    @pytest.mark.parametrize("hq,hkv", [(16, 4), (8, 4), (8, 8)])
    @pytest.mark.parametrize("d,dtype", [(64, torch.bfloat16), (128, torch.bfloat16), (128, torch.float16),
                                         (64, torch.float32)])
    def test_gradients_real_shapes(self, backend, hq, hkv, d, dtype):
        tree = self._tree()
        u = tree.visible_end.numel()
        q, k, v, g_out, g_lse = _inputs(tree, hq, hkv, d, dtype, "cuda")
        plan = tree_attention_plan(tree, device="cuda", backend=backend)
        got = _grads(*tree_attention(q, k, v, plan, backend=backend), (q, k, v), g_out, g_lse)
        ve = plan.visible_end
        leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
        expected = _grads(*tree_attention_ref(*leaves64, ve), leaves64, g_out.double(), g_lse.double())
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        ref = _grads(*tree_attention_ref(*leaves, ve, upcast=False), leaves, g_out, g_lse)
        for n, a, r, e in zip("qkv", got, ref, expected):
            atol = 2 * float((r.double() - e).abs().max()) + SMALL_ATOL[dtype]
            assert_close_verbose(a, e, atol=atol, name=f"{backend} d{n} (U={u})")

    def test_triton_views_and_skipped_blocks(self):
        tree = build_prefix_trie([[1] + [2] * 127 + [3] + [4] * 127, [1] + [2] * 127 + [5] + [6] * 127])
        u, hq, hkv, d = tree.visible_end.numel(), 8, 2, 128
        base = [torch.randn(1, h, u, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv)]
        with torch.no_grad():
            for x in base:
                x[:, :, 128:256] = float("nan")  # response A; 64-row tiles: B never meets A
        leaves = [x.requires_grad_() for x in base]
        views = [x[0].transpose(0, 1) for x in leaves]
        g_out = torch.randn(u, hq, d, device="cuda", dtype=torch.bfloat16)
        g_out[128:256] = float("nan")
        plan = tree_attention_plan(tree, device="cuda")
        got = [g[0].transpose(0, 1) for g in _grads(*tree_attention(*views, plan, backend="triton"), leaves, g_out,
                                                    None)]
        for n, g in zip("qkv", got):
            assert torch.isfinite(g[256:]).all(), f"d{n} of response B read a skipped tile"
