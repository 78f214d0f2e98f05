"""tree_attention against an independent oracle: the mask comes from the trie's node_parent ancestry
(not from visible_end), the softmax runs in fp64, and packed outputs must equal plain causal attention
over each input sequence's rows."""

from __future__ import annotations

import importlib.util
import random
from types import SimpleNamespace

import pytest
import torch

from credit_kernels.prefix_trie import build_prefix_trie
from credit_kernels.tree_attention import (
    BLOCK_M,
    TreeAttentionPlan,
    _build_plan,
    _tree_attention_fwd,
    tree_attention,
    tree_attention_plan,
    tree_attention_ref,
)
from tests.utils import HAS_CUDA, INTERPRET, TRITON_DEVICE, assert_close_verbose

needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="needs CUDA or TRITON_INTERPRET=1")
HAS_FLEX = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


# ---------------------------------------------------------------------------------------------------------------------
# tries and the oracle
# ---------------------------------------------------------------------------------------------------------------------
def _random_seqs(n: int, *, max_new: int, seed: int, vocab: int = 50) -> list[list[int]]:
    """Sequences that branch off random prefixes of earlier ones; some duplicates and an empty one."""
    rng = random.Random(seed)
    seqs = [[rng.randrange(vocab) for _ in range(rng.randint(1, max_new))]]
    while len(seqs) < n:
        r = rng.random()
        base = rng.choice(seqs)
        if r < 0.1:
            seqs.append(list(base))  # identical sequence
        elif r < 0.15:
            seqs.append([])
        else:
            cut = rng.randint(0, len(base))
            seqs.append(base[:cut] + [rng.randrange(vocab) for _ in range(rng.randint(1, max_new))])
    return seqs


def _oracle_mask(tree) -> torch.Tensor:
    """[U, U] bool from node ancestry: i sees j iff j's node is a proper ancestor of i's, or is i's and j <= i."""
    parent = tree.node_parent.tolist()
    node = tree.token_node.tolist()
    u = len(node)
    ancestors = []
    for nd in range(len(parent)):
        a, p = set(), parent[nd]
        while p >= 0:
            a.add(p)
            p = parent[p]
        ancestors.append(a)
    mask = torch.zeros(u, u, dtype=torch.bool)
    for i in range(u):
        for j in range(i + 1):
            mask[i, j] = node[j] in ancestors[node[i]] or node[j] == node[i]
    return mask


def _oracle(q, k, v, mask, scale=None):
    """fp64 dense masked softmax attention with GQA expansion. Returns out [U, Hq, D], lse [U, Hq] fp64."""
    u, hq, d = q.shape
    g = hq // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    qd = q.double().transpose(0, 1)
    kd = k.double().repeat_interleave(g, 1).transpose(0, 1)
    vd = v.double().repeat_interleave(g, 1).transpose(0, 1)
    s = (qd @ kd.transpose(1, 2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.exp(s - lse[..., None]) @ vd
    return out.transpose(0, 1), lse.transpose(0, 1)


def _qkv(u, hq, hkv, d, dtype, device="cpu"):
    mk = lambda h: torch.randn(u, h, d, dtype=torch.float32).to(device=device, dtype=dtype)  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv)


TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 1e-3)}  # (out, lse) atol


def _check_against_oracle(out, lse, q, k, v, tree, *, scale=None, low_ref=True):
    """Oracle on the same (rounded) inputs; low precision also within 2x the same-dtype reference's error."""
    eo, el = _oracle(q.cpu(), k.cpu(), v.cpu(), _oracle_mask(tree), scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    atol_o, atol_l = TOL[q.dtype]
    if q.dtype != torch.float32 and low_ref:
        ro, _ = tree_attention_ref(q.cpu(), k.cpu(), v.cpu(), tree.visible_end, scale=scale, upcast=False)
        atol_o = max(atol_o, 2 * float((ro.double() - eo).abs().max()) + 1e-3)
    assert_close_verbose(out, eo, atol=atol_o, name="out")
    assert_close_verbose(lse, el, atol=atol_l, rtol=1e-5, name="lse")


TRIES = {
    "shared": lambda: build_prefix_trie(_random_seqs(12, max_new=14, seed=1)),
    "single": lambda: build_prefix_trie([list(range(77))]),
    "identical": lambda: build_prefix_trie([[3, 1, 4, 1, 5, 9, 2, 6]] * 3 + [[3, 1, 4, 7]]),
    "forest": lambda: build_prefix_trie([[i] + list(range(10, 10 + 9 + i)) for i in range(6)]),
}


# ---------------------------------------------------------------------------------------------------------------------
# reference (the CPU path)
# ---------------------------------------------------------------------------------------------------------------------
def test_trie_layout_is_the_attention_contract():
    """The fields the oracle and the kernel read, on a hand-checked batch."""
    tree = build_prefix_trie([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 4], [], [7, 8]])
    # preorder rows: 1 2 3 4 | 5 | 7 8 ; nodes: [1 2] -> {[3 4], [5]}, [7 8]
    assert tree.tokens.tolist() == [1, 2, 3, 4, 5, 7, 8]
    assert tree.positions.tolist() == [0, 1, 2, 3, 2, 0, 1]
    assert tree.visible_end.tolist() == [5, 5, 4, 4, 5, 7, 7]
    assert tree.node_parent.tolist() == [-1, 0, 0, -1]
    assert tree.token_node.tolist() == [0, 0, 1, 1, 2, 3, 3]
    assert tree.seq_ptr.tolist() == [0, 4, 7, 11, 11, 13]
    assert tree.seq_rows.tolist() == [0, 1, 2, 3, 0, 1, 4, 0, 1, 2, 3, 5, 6]


@pytest.mark.parametrize("name", list(TRIES))
@pytest.mark.parametrize("hq,hkv,d", [(4, 1, 16), (2, 2, 32), (8, 2, 64)])
def test_reference_matches_ancestry_oracle(name, hq, hkv, d):
    tree = TRIES[name]()
    q, k, v = _qkv(tree.visible_end.numel(), hq, hkv, d, torch.float32)
    out, lse = tree_attention(q, k, v, tree, backend="torch")
    _check_against_oracle(out, lse, q, k, v, tree)
    out2, lse2 = tree_attention_ref(q, k, v, tree.visible_end, chunk_rows=7)  # chunking changes nothing
    assert_close_verbose(out2, out, atol=1e-6)
    assert_close_verbose(lse2, lse, atol=1e-6)


def test_packed_rows_equal_per_sequence_causal_attention():
    """Each input sequence, gathered from the packed rows, sees exactly plain causal attention."""
    tree = build_prefix_trie(_random_seqs(10, max_new=12, seed=7))
    q, k, v = _qkv(tree.visible_end.numel(), 4, 2, 32, torch.float64)
    out, lse = tree_attention_ref(q, k, v, tree.visible_end, scale=0.3)
    ptr = tree.seq_ptr.tolist()
    for s in range(len(ptr) - 1):
        rows = tree.seq_rows[ptr[s]:ptr[s + 1]]
        if rows.numel() == 0:
            continue
        qs, ks, vs = (x[rows].transpose(0, 1) for x in (q, k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=0.3, enable_gqa=True)
        assert_close_verbose(out[rows], ref.transpose(0, 1), atol=1e-12, name=f"seq {s}")


def test_single_sequence_equals_causal_sdpa_and_lse_is_natural_log():
    u, scale = 45, 0.2
    q, k, v = _qkv(u, 2, 2, 16, torch.float64)
    out, lse = tree_attention_ref(q, k, v, torch.full((u,), u), scale=scale)
    qt, kt, vt = (x.transpose(0, 1) for x in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    assert_close_verbose(out, ref.transpose(0, 1), atol=1e-12)
    s = (qt @ kt.transpose(1, 2) * scale).masked_fill(~torch.ones(u, u, dtype=torch.bool).tril(), float("-inf"))
    assert_close_verbose(lse, torch.logsumexp(s, -1).T, atol=1e-12)


def test_reference_gradient_matches_oracle():
    tree = TRIES["shared"]()
    q, k, v = (x.requires_grad_() for x in _qkv(tree.visible_end.numel(), 4, 2, 16, torch.float64))
    out, lse = tree_attention_ref(q, k, v, tree.visible_end, chunk_rows=16)
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
    eo, el = _oracle(q, k, v, _oracle_mask(tree))
    expected = torch.autograd.grad((eo * g_out).sum() + (el * g_lse).sum(), (q, k, v))
    for name, a, e in zip("qkv", grads, expected):
        assert_close_verbose(a, e, atol=1e-10, name=f"d{name}")


def test_empty_trie():
    q, k, v = _qkv(0, 2, 1, 16, torch.float32)
    out, lse = tree_attention(q, k, v, SimpleNamespace(visible_end=torch.zeros(0, dtype=torch.int32)))
    assert out.shape == (0, 2, 16) and lse.shape == (0, 2)


# ---------------------------------------------------------------------------------------------------------------------
# block plan: exactly the KV blocks with a visible key
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bm,bn", [(16, 16), (16, 32), (32, 16), (64, 64)])
@pytest.mark.parametrize("name", ["shared", "forest", "single"])
def test_plan_lists_exactly_the_needed_blocks(name, bm, bn):
    tree = TRIES[name]()
    u = tree.visible_end.numel()
    plan = _build_plan(tree.visible_end, bm, bn)
    mask = _oracle_mask(tree)
    n_m, n_n = -(-u // bm), -(-u // bn)
    ptr, idx = plan.block_ptr.tolist(), plan.block_idx.tolist()
    assert len(ptr) == n_m + 1 and ptr[-1] == len(idx)
    for m in range(n_m):
        needed = [b for b in range(n_n) if mask[m * bm:(m + 1) * bm, b * bn:(b + 1) * bn].any()]
        assert idx[ptr[m]:ptr[m + 1]] == needed, f"query block {m}"


def test_plan_cost_follows_attended_tokens():
    """64 independent 64-token sequences: each query block visits 1 KV block, not the causal triangle."""
    tree = build_prefix_trie([[s] + [100 + s] * 63 for s in range(64)])
    plan = tree_attention_plan(tree)
    assert plan.block_idx.numel() == 64
    assert plan.block_idx.tolist() == list(range(64))


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernel (compiled on CUDA, interpreted on CPU: keep shapes small there)
# ---------------------------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize(
    "name,hq,hkv,d,dtype",
    [
        ("shared", 4, 1, 16, torch.float32),  # GQA 4:1
        ("single", 2, 2, 32, torch.float32),  # 1:1, U = 77 not a multiple of the block
        ("identical", 2, 1, 64, torch.bfloat16),
        ("shared", 2, 2, 32, torch.float16),
    ],
)
def test_triton_matches_oracle(name, hq, hkv, d, dtype):
    tree = TRIES[name]()
    q, k, v = _qkv(tree.visible_end.numel(), hq, hkv, d, dtype, TRITON_DEVICE)
    out, lse = tree_attention(q, k, v, tree, backend="triton")  # the host-side PrefixTrie itself
    _check_against_oracle(out.cpu(), lse.cpu(), q, k, v, tree)


@needs_triton
def test_triton_small_blocks_multi_block_sparsity():
    """16-row tiles over a branching trie: many partially visible and skipped tiles, U % 16 != 0."""
    tree = TRIES["shared"]()
    assert tree.visible_end.numel() % 16 != 0
    q, k, v = _qkv(tree.visible_end.numel(), 2, 1, 16, torch.float32, TRITON_DEVICE)
    plan = _build_plan(tree.visible_end.to(TRITON_DEVICE), 16, 16)
    out, lse = _tree_attention_fwd(q, k, v, plan, 0.7)
    _check_against_oracle(out.cpu(), lse.cpu(), q, k, v, tree, scale=0.7)


@needs_triton
def test_triton_never_reads_skipped_blocks():
    """NaN values in the first sequence's rows: the second sequence's outputs stay finite and exact, so
    its query blocks never loaded those KV blocks (a loaded, masked NaN value still poisons p @ v)."""
    tree = build_prefix_trie([[1] + [2] * 31, [3] + [4] * 40])
    q, k, v = _qkv(tree.visible_end.numel(), 2, 2, 16, torch.float32, TRITON_DEVICE)
    v[:32] = float("nan")
    plan = _build_plan(tree.visible_end.to(TRITON_DEVICE), 16, 16)
    out, lse = _tree_attention_fwd(q, k, v, plan, 0.25)
    assert torch.isnan(out[:32]).all()
    eo, el = _oracle(q[32:].cpu(), k[32:].cpu(), v[32:].cpu(), torch.ones(41, 41, dtype=torch.bool).tril(), 0.25)
    assert_close_verbose(out[32:].cpu(), eo, atol=2e-5)
    assert_close_verbose(lse[32:].cpu(), el, atol=2e-5)


@needs_triton
def test_triton_plan_reuse_and_noncontiguous_heads():
    """A prebuilt plan serves several calls; q/k/v as strided views of a fused qkv projection."""
    tree = TRIES["forest"]()
    u = tree.visible_end.numel()
    qkv = torch.randn(u, 4 + 1 + 1, 32, device=TRITON_DEVICE)
    q, k, v = qkv[:, :4], qkv[:, 4:5], qkv[:, 5:]
    plan = tree_attention_plan(tree, device=TRITON_DEVICE)
    assert isinstance(plan, TreeAttentionPlan) and plan.block_m == BLOCK_M
    out, lse = tree_attention(q, k, v, plan, backend="triton", scale=0.5)
    _check_against_oracle(out.cpu(), lse.cpu(), q, k, v, tree, scale=0.5)


@needs_triton
def test_op_opcheck_and_compile():
    tree = TRIES["identical"]()
    q, k, v = _qkv(tree.visible_end.numel(), 2, 1, 16, torch.float32, TRITON_DEVICE)
    plan = tree_attention_plan(SimpleNamespace(visible_end=tree.visible_end.to(TRITON_DEVICE)))
    args = (q, k, v, plan.visible_end, plan.block_ptr, plan.block_idx, 0.25, plan.block_m, plan.block_n)
    torch.library.opcheck(torch.ops.credit.tree_attention.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    # autograd registration: with q requiring grad the op goes through the registered backward
    torch.library.opcheck(torch.ops.credit.tree_attention.default, (q.detach().clone().requires_grad_(),) + args[1:],
                          test_utils=("test_autograd_registration",))
    compiled = torch.compile(lambda q, k, v: tree_attention(q, k, v, plan, scale=0.25, backend="triton"),
                             fullgraph=True, backend="aot_eager")
    out, lse = compiled(q, k, v)
    eo, el = tree_attention(q, k, v, plan, scale=0.25, backend="triton")
    assert torch.equal(out, eo) and torch.equal(lse, el)


# ---------------------------------------------------------------------------------------------------------------------
# FlexAttention backend (eager, unfused, on CPU; compiled on CUDA)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_FLEX, reason="torch has no flex_attention")
@pytest.mark.parametrize("name,hq,hkv", [("shared", 4, 1), ("single", 2, 2), ("forest", 2, 1)])
def test_flex_matches_oracle(name, hq, hkv):
    # 128-row flex tiles: "single" (77 rows) is one partial tile, "shared"/"forest" mix full and partial
    tree = TRIES[name]()
    q, k, v = _qkv(tree.visible_end.numel(), hq, hkv, 16, torch.float32)
    out, lse = tree_attention(q, k, v, tree, backend="flex", scale=0.4)
    _check_against_oracle(out, lse, q, k, v, tree, scale=0.4)


@pytest.mark.skipif(not HAS_FLEX, reason="torch has no flex_attention")
def test_flex_full_and_partial_tiles_on_a_long_trie():
    """U = 300 over several 128-tiles: full tiles (skipping mask_mod) must agree with the reference."""
    tree = build_prefix_trie([list(range(150)) + [1000 + i] * (i + 1) for i in range(5)] + [[7] * 120])
    q, k, v = _qkv(tree.visible_end.numel(), 2, 1, 16, torch.float32)
    out, lse = tree_attention(q, k, v, tree, backend="flex")
    ro, rl = tree_attention_ref(q, k, v, tree.visible_end)
    assert_close_verbose(out, ro, atol=2e-5)
    assert_close_verbose(lse, rl, atol=2e-5)


# ---------------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------------
def _bad_cases():
    t = SimpleNamespace(visible_end=torch.full((8,), 8, dtype=torch.int32))
    q, k, v = _qkv(8, 4, 2, 16, torch.float32)
    return [
        ((q, k[:, :1].expand(8, 3, 16), v[:, :1].expand(8, 3, 16), t), ValueError, "multiple of k's heads"),
        ((q[0], k, v, t), ValueError, "q must be 3-D"),
        ((q, k, v[:, :1], t), ValueError, "v must have k's shape"),
        ((q, k[:5], v[:5], t), ValueError, r"k must have shape \[U, Hkv, D\]"),
        ((q, k[..., :8], v[..., :8], t), ValueError, r"k must have shape"),
        ((q.double(), k.double(), v.double(), t), TypeError, "q must be bf16/fp16/fp32"),
        ((q, k.half(), v.half(), t), TypeError, "k and v must have q's dtype"),
        ((q, k, v, SimpleNamespace(visible_end=t.visible_end[:5])), ValueError, "visible_end must have U = 8"),
        ((q, k, v, SimpleNamespace(visible_end=t.visible_end.float())), ValueError, "visible_end must be a 1-D int"),
        ((q, k, v, SimpleNamespace(visible_end=torch.arange(8))), ValueError, r"visible_end\[0\] = 0"),
        ((q, k, v, SimpleNamespace(visible_end=torch.full((8,), 9))), ValueError, "<= U = 8"),
        ((q, k, v, object()), TypeError, "tree must be a PrefixTrie"),
        ((q.numpy(), k, v, t), TypeError, "q must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_names_the_argument(case):
    args, exc, msg = _bad_cases()[case]
    with pytest.raises(exc, match=msg):
        tree_attention(*args)


def test_bad_backend_and_triton_head_dim():
    t = SimpleNamespace(visible_end=torch.full((4,), 4, dtype=torch.int32))
    q, k, v = _qkv(4, 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        tree_attention(q, k, v, t, backend="cuda")
    if INTERPRET or HAS_CUDA:
        q, k, v = _qkv(4, 2, 2, 24, torch.float32, TRITON_DEVICE)
        with pytest.raises(ValueError, match="D=24"):
            tree_attention(q, k, v, SimpleNamespace(visible_end=t.visible_end.to(TRITON_DEVICE)), backend="triton")
    else:
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            tree_attention(q, k, v, t, backend="triton")


# ---------------------------------------------------------------------------------------------------------------------
# GPU (real shapes)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flex"])
@pytest.mark.parametrize("d,dtype", [(64, torch.bfloat16), (128, torch.bfloat16), (128, torch.float16)])
def test_gpu_real_shapes(backend, d, dtype):
    seqs = [list(range(300)) + [1000 + p] * 200 + [2000 + p * 10 + r] * (50 + 37 * r)
            for p in range(4) for r in range(4)]
    tree = build_prefix_trie(seqs)
    u = tree.visible_end.numel()
    q, k, v = _qkv(u, 16, 4, d, dtype, "cuda")
    out, lse = tree_attention(q, k, v, SimpleNamespace(visible_end=tree.visible_end.cuda()), backend=backend)
    eo, el = tree_attention_ref(q.double(), k.double(), v.double(), tree.visible_end.cuda())
    ro, _ = tree_attention_ref(q, k, v, tree.visible_end.cuda(), upcast=False)
    ref_err = float((ro.double() - eo).abs().max())
    assert_close_verbose(out, eo, atol=2 * ref_err + 1e-3, name="out")
    assert_close_verbose(lse, el, atol=1e-3, rtol=1e-4, name="lse")
