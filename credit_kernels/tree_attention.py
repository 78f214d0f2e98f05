"""Tree attention: packed attention over a prefix trie (docs/design.md, "The ops" 3).

The trie lays its unique tokens out in DFS preorder (`credit_kernels/prefix_trie.py`), so packed
query row i may attend to packed key row j iff

    j <= i  and  i < visible_end[j]

(j in an ancestor node of i's node: i lies in that node's subtree; j in the same node: causal).
Each row therefore attends causally within its node and fully to its ancestors, and computing a
shared prefix once serves every sequence that continues it.

Backends (all differentiable in q, k, v, and through lse):
- "triton": a flash-attention style kernel (online softmax, fp32 accumulation). A host-side plan
  lists, per query block, the KV blocks holding at least one visible key (CSR), so the cost is
  proportional to the attended tokens; masked-out KV blocks are never loaded. The backward
  (`tree_attention_bwd.py`) recomputes P from the saved logsumexp: dK/dV per KV block over the
  query blocks that see it (the plan's transposed CSR), dQ per query block over its KV blocks.
- "flex": `torch.nn.attention.flex_attention` with a BlockMask built from the same block rule
  (full blocks skip the mask). On CPU it runs flex's unfused eager path (tests only), which torch
  gives no backward: asking for a gradient there raises NotImplementedError.
- "torch": `tree_attention_ref`, a dense-mask reference chunked over queries; the CPU path and the
  test oracle, differentiable through autograd (each chunk recomputed in the backward, so memory
  stays one chunk's scores).

Build a `tree_attention_plan` once per trie and pass it to every layer: it holds both block lists
and, with backend="flex", the BlockMask.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple, Optional

import torch
import torch.utils.checkpoint

from credit_kernels import _core
from credit_kernels._core import HAS_TRITON, INTERPRET
from credit_kernels.tree_attention_bwd import _tree_attention_bwd, _tree_attention_bwd_torch

if HAS_TRITON:
    import triton
    import triton.language as tl

# One fixed config (DESIGN: autotuning only behind CREDIT_AUTOTUNE=1). 64 x 64 tiles, 4 warps, 2 stages is
# the usual flash-attention forward point for head dims 64/128 on sm_90; not yet tuned on a card.
BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 2
GPU_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BACKENDS = ("auto", "triton", "flex", "torch")
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2


class TreeAttentionOutput(NamedTuple):
    out: torch.Tensor  # [U, Hq, D] q's dtype
    lse: torch.Tensor  # [U, Hq] fp32, natural log


class TreeAttentionPlan(NamedTuple):
    """Which KV blocks each query block visits, and the transpose; build once per trie, reuse across layers.

    visible_end:     [U] int32, as in PrefixTrie.
    block_ptr:       [ceil(U / block_m) + 1] int32 CSR offsets into block_idx.
    block_idx:       [nnz] int32 KV block indices, ascending within each query block (forward, dQ).
    q_block_ptr:     [ceil(U / block_n) + 1] int32 CSR offsets into q_block_idx.
    q_block_idx:     [nnz] int32 query block indices that see each KV block, ascending (dK, dV).
    flex_block_mask: the FlexAttention BlockMask (`tree_attention_plan(..., backend="flex")`), else None.
    """

    visible_end: torch.Tensor
    block_ptr: torch.Tensor
    block_idx: torch.Tensor
    block_m: int
    block_n: int
    q_block_ptr: Optional[torch.Tensor] = None  # None only in plans built by hand: the backward derives it
    q_block_idx: Optional[torch.Tensor] = None
    flex_block_mask: Any = None


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _tree_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, ve_ptr, block_ptr_ptr, block_idx_ptr, out_ptr, lse_ptr,
        U, qk_scale,
        stride_q_u, stride_q_h, stride_k_u, stride_k_h, stride_v_u, stride_v_h,
        stride_o_u, stride_o_h, stride_lse_u, stride_lse_h,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One program: BLOCK_M query rows of one query head.

        q/out: [U, Hq, HEAD_DIM]; k/v: [U, Hkv, HEAD_DIM], last dim contiguous; ve: [U] int32;
        block_ptr: [num_m_blocks + 1] int32; block_idx: [nnz] int32; lse: [U, Hq] fp32.
        qk_scale = softmax scale * log2(e): the softmax runs in base 2 (exp2), accumulation in fp32.
        """
        pid_m = tl.program_id(0)
        pid_h = tl.program_id(1)
        kv_h = pid_h // GROUP  # GQA: GROUP consecutive query heads share one KV head

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < U
        # int64 row offsets: U * H * D passes 2^31 for long packed batches
        q_rows = offs_m.to(tl.int64) * stride_q_u + pid_h * stride_q_h
        q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        if UPCAST_DOT:  # the Triton interpreter's bf16/fp16 tl.dot is wrong: upcast
            q = q.to(tl.float32)

        # A finite start keeps exp2(m_i - m_new) defined when a block masks a whole row.
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        # 1. visit only the KV blocks listed for this query block (the plan's CSR row)
        start = tl.load(block_ptr_ptr + pid_m)
        end = tl.load(block_ptr_ptr + pid_m + 1)
        for t in range(start, end):
            nb = tl.load(block_idx_ptr + t)
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = offs_n < U
            offs_n64 = offs_n.to(tl.int64)
            k = tl.load(k_ptr + (offs_n64 * stride_k_u + kv_h * stride_k_h)[None, :] + offs_d[:, None],
                        mask=col_ok[None, :], other=0.0)  # [HEAD_DIM, BLOCK_N]
            v = tl.load(v_ptr + (offs_n64 * stride_v_u + kv_h * stride_v_h)[:, None] + offs_d[None, :],
                        mask=col_ok[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
            ve = tl.load(ve_ptr + offs_n, mask=col_ok, other=0)  # 0: padded keys are visible to no row
            if UPCAST_DOT:
                k = k.to(tl.float32)
                v = v.to(tl.float32)

            # 2. scores in base 2, exact element mask  (j <= i) & (i < visible_end[j])
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
            visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < ve[None, :])
            s = tl.where(visible, s, float("-inf"))

            # 3. online softmax: rescale the running sum and accumulator to the new row max
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        # 4. normalise; every real row sees at least itself, l_i == 0 only on padding rows
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # base 2 -> natural log
        o_rows = offs_m.to(tl.int64) * stride_o_u + pid_h * stride_o_h
        tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptr + offs_m.to(tl.int64) * stride_lse_u + pid_h * stride_lse_h, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------------------
# Block plans (torch ops, on the trie's device)
# ---------------------------------------------------------------------------------------------------------------------
def _block_ranges(ve: torch.Tensor, block_m: int, block_n: int):
    """For KV block b, the query blocks that need it form one range [lo_b, hi_b].

    Query block [m0, m1) needs KV block b iff b_start <= m1 - 1 and max(visible_end over b) > m0. In a
    preorder layout this is exact (some pair in the tile is visible), not just conservative.
    """
    u = ve.numel()
    n_blocks = -(-u // block_n)
    ve64 = ve.to(torch.int64)
    padded = torch.nn.functional.pad(ve64, (0, n_blocks * block_n - u), value=0)
    max_ve = padded.view(n_blocks, block_n).amax(1).clamp(max=u)  # clamp: memory-safe even with check_inputs=False
    b_start = torch.arange(n_blocks, device=ve.device, dtype=torch.int64) * block_n
    lo = b_start // block_m
    hi = torch.maximum((max_ve - 1) // block_m, lo)
    return lo, hi


def _build_plan(visible_end: torch.Tensor, block_m: int, block_n: int) -> TreeAttentionPlan:
    """Both CSRs (per query block: its KV blocks; per KV block: its query blocks), ascending; O(nnz) memory."""
    u = visible_end.numel()
    ve = visible_end.to(torch.int32).contiguous()
    dev = ve.device
    n_m = -(-u // block_m)
    if u == 0:
        z = torch.zeros(1, dtype=torch.int32, device=dev)
        return TreeAttentionPlan(ve, z, z[:0], block_m, block_n, z.clone(), z[:0])
    lo, hi = _block_ranges(ve, block_m, block_n)
    counts = hi - lo + 1
    b_rep = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), counts)  # syncs once for the size
    first = torch.cumsum(counts, 0) - counts
    m_rep = lo[b_rep] + torch.arange(b_rep.numel(), device=dev) - first[b_rep]
    # (b_rep, m_rep) is already ordered by (kv block, query block): it is the transposed CSR as it stands
    q_block_ptr = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=dev)
    q_block_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    key, _ = torch.sort(m_rep * counts.numel() + b_rep)  # order by (query block, kv block)
    block_idx = (key % counts.numel()).to(torch.int32)
    block_ptr = torch.zeros(n_m + 1, dtype=torch.int32, device=dev)
    block_ptr[1:] = torch.cumsum(torch.bincount(key // counts.numel(), minlength=n_m), 0).to(torch.int32)
    return TreeAttentionPlan(ve, block_ptr, block_idx, block_m, block_n, q_block_ptr, m_rep.to(torch.int32))


def _tree_attention_fwd(q, k, v, plan: TreeAttentionPlan, scale: float):
    """Launch the Triton kernel. q [U, Hq, D], k/v [U, Hkv, D]; returns (out [U, Hq, D], lse [U, Hq] fp32)."""
    u, hq, d = q.shape
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((u, hq), dtype=torch.float32, device=q.device)
    if u == 0:
        return out, lse
    interp = INTERPRET
    grid = (plan.block_ptr.numel() - 1, hq)
    _tree_attention_fwd_kernel[grid](
        q, k, v, plan.visible_end, plan.block_ptr, plan.block_idx, out, lse,
        u, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        GROUP=hq // k.shape[1], HEAD_DIM=d, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        UPCAST_DOT=interp and q.dtype != torch.float32,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 is the test dtype: no TF32 rounding
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    return out, lse


# ---------------------------------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("credit::tree_attention", mutates_args=())
@_core.no_autocast
def _tree_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible_end: torch.Tensor,
    block_ptr: torch.Tensor,
    block_idx: torch.Tensor,
    scale: float,
    block_m: int,
    block_n: int,
    q_block_ptr: Optional[torch.Tensor] = None,
    q_block_idx: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [U, Hq, D], lse [U, Hq] fp32). q_block_ptr / q_block_idx (the transposed CSR) serve the backward."""
    plan = TreeAttentionPlan(visible_end, block_ptr, block_idx, block_m, block_n)
    if q.device.type == "cpu" and not INTERPRET:  # CPU tensors run the reference, unless interpreting
        out, lse = tree_attention_ref(q, k, v, visible_end, scale=scale)
        return out, lse
    return _tree_attention_fwd(q, k, v, plan, scale)


@_tree_attention_op.register_fake
def _(q, k, v, visible_end, block_ptr, block_idx, scale, block_m, block_n, q_block_ptr=None, q_block_idx=None):
    torch._check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3, lambda: "tree_attention: q, k, v must be 3-D")
    torch._check(k.shape[0] == q.shape[0] and visible_end.shape[0] == q.shape[0], lambda: "tree_attention: U differs")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # as the launcher allocates it
    return out, q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("credit::tree_attention_backward", mutates_args=())
@_core.no_autocast
def _tree_attention_backward_op(
    grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor],
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    visible_end: torch.Tensor, block_ptr: torch.Tensor, block_idx: torch.Tensor,
    q_block_ptr: Optional[torch.Tensor], q_block_idx: Optional[torch.Tensor],
    scale: float, block_m: int, block_n: int, needs_q_grad: bool, needs_kv_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dq [U, Hq, D] or [0], dk, dv [U, Hkv, D] or [0]) in the inputs' dtypes; grad_lse None: lse unused."""
    if q.device.type == "cpu" and not INTERPRET:
        dq, dk, dv = _tree_attention_bwd_torch(grad_out, grad_lse, q, k, v, out, lse, visible_end, scale)
    else:
        if q_block_ptr is None or q_block_idx is None:  # a plan built by hand: derive the transpose (one sync)
            t = _build_plan(visible_end, block_m, block_n)
            q_block_ptr, q_block_idx = t.q_block_ptr, t.q_block_idx
        dq, dk, dv = _tree_attention_bwd(
            grad_out, grad_lse, q, k, v, out, lse, visible_end, block_ptr, block_idx, q_block_ptr, q_block_idx,
            scale, block_m, block_n, needs_q_grad, needs_kv_grad, INTERPRET,
        )  # fmt: skip
    empty = q.new_empty((0,))
    return dq if needs_q_grad else empty, dk if needs_kv_grad else empty, dv if needs_kv_grad else empty.clone()


@_tree_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, visible_end, block_ptr, block_idx, q_block_ptr, q_block_idx, scale,
      block_m, block_n, needs_q_grad, needs_kv_grad):
    torch._check(grad_out.shape == q.shape, lambda: "tree_attention_backward: grad_out must have q's shape")
    return (q.new_empty(q.shape if needs_q_grad else (0,)), k.new_empty(k.shape if needs_kv_grad else (0,)),
            v.new_empty(v.shape if needs_kv_grad else (0,)))


def _setup_context(ctx, inputs, output):
    q, k, v, visible_end, block_ptr, block_idx, scale, block_m, block_n, q_block_ptr, q_block_idx = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, visible_end, block_ptr, block_idx, q_block_ptr, q_block_idx)
    ctx.args = (scale, block_m, block_n)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, visible_end, block_ptr, block_idx, q_block_ptr, q_block_idx = ctx.saved_tensors
    needs_dq = ctx.needs_input_grad[0]  # autograd calls this only when one of q, k, v needs a gradient
    needs_dkv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    if grad_out is None:  # autograd materialises unused outputs' gradients as zeros; guard anyway
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _tree_attention_backward_op(
        grad_out, grad_lse, q, k, v, out, lse, visible_end, block_ptr, block_idx, q_block_ptr, q_block_idx,
        *ctx.args, needs_dq, needs_dkv,
    )  # fmt: skip
    return (
        dq if needs_dq else None, dk if ctx.needs_input_grad[1] else None, dv if ctx.needs_input_grad[2] else None,
        None, None, None,  # visible_end, block_ptr, block_idx
        None, None, None,  # scale, block_m, block_n
        None, None,  # q_block_ptr, q_block_idx
    )


_tree_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------------
# Reference and FlexAttention paths
# ---------------------------------------------------------------------------------------------------------------------
def tree_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible_end: torch.Tensor,
    *,
    scale: float | None = None,
    upcast: bool = True,
    chunk_rows: int | None = None,
) -> TreeAttentionOutput:
    """Masked tree attention in PyTorch, chunked over query rows; each chunk scores only its visible keys.

    Args:
        q: [U, Hq, D] any float dtype; k, v: [U, Hkv, D], same dtype, Hq % Hkv == 0.
        visible_end: [U] integer; key j is visible to query i iff j <= i < visible_end[j].
        scale: softmax scale, default D ** -0.5.
        upcast: compute in fp32 (fp64 stays fp64) instead of the input dtype.
        chunk_rows: query rows per chunk; default keeps about 64M scores per chunk.

    Returns:
        out [U, Hq, D] in q's dtype, lse [U, Hq] fp32 (fp64 for fp64 input). Differentiable through
        autograd; when a gradient is wanted each chunk is checkpointed (recomputed in the backward), so
        autograd keeps one chunk's probabilities at a time, not the whole attention matrix.
    """
    u, hq, d = q.shape
    scale = d**-0.5 if scale is None else scale
    cdt = torch.float64 if q.dtype == torch.float64 else (torch.float32 if upcast else q.dtype)
    lse_dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Small query chunks keep the work near the attended pairs: a chunk only scores the keys visible to at
    # least one of its rows (its ancestors' rows and its own), not the whole prefix of the packed buffer.
    c = chunk_rows if chunk_rows is not None else max(1, min(256, (64 << 20) // max(1, hq * u)))
    ve = visible_end.to(device=q.device, dtype=torch.int64)
    kc = k.to(cdt).transpose(0, 1)  # [Hkv, U, D]
    vc = v.to(cdt).transpose(0, 1)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outs, lses = [], []
    for a in range(0, u, c):
        b = min(u, a + c)
        # key j is visible to some row i in [a, b) iff j < b and visible_end[j] > a (j <= i < visible_end[j])
        keys = torch.nonzero(ve[:b] > a).squeeze(1)
        args = (q, kc, vc, ve, keys, a, b, scale, cdt)
        # the chunk takes the whole tensors and slices inside, so the checkpoint saves no per-chunk copies
        if grad:
            o, lse = torch.utils.checkpoint.checkpoint(_ref_chunk, *args, use_reentrant=False)
        else:
            o, lse = _ref_chunk(*args)
        outs.append(o.transpose(0, 1).to(q.dtype))
        lses.append(lse.transpose(0, 1).to(lse_dt))
    if not outs:
        return TreeAttentionOutput(torch.empty_like(q), q.new_empty((0, hq), dtype=lse_dt))
    return TreeAttentionOutput(torch.cat(outs), torch.cat(lses))


def _ref_chunk(q, kc, vc, ve, keys, a: int, b: int, scale: float, cdt):
    """Query rows [a, b) against their visible `keys`: (out [Hq, n, D], lse [Hq, n]) in cdt."""
    n, (hkv, _, d), hq = b - a, kc.shape, q.shape[1]
    group = hq // hkv
    qc = q[a:b].to(cdt).transpose(0, 1).reshape(hkv, group * n, d)  # heads h = kv * group + g
    s = (qc @ kc[:, keys].transpose(1, 2)).view(hkv, group, n, keys.numel()) * scale
    i = torch.arange(a, b, device=q.device)[:, None]
    visible = (keys[None, :] <= i) & (i < ve[keys][None, :])
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [Hkv, G, n]
    p = torch.exp(s - lse[..., None])
    o = (p.view(hkv, group * n, keys.numel()) @ vc[:, keys]).view(hq, n, d)
    return o, lse.reshape(hq, n)


FLEX_BLOCK = 128  # flex_attention's default tile
_flex_compiled = None


def _flex_block_mask(visible_end: torch.Tensor, block: int = FLEX_BLOCK):
    """A flex BlockMask from visible_end: partial tiles run mask_mod, full tiles skip it."""
    from torch.nn.attention.flex_attention import BlockMask

    u = visible_end.numel()
    dev = visible_end.device
    ve = visible_end.to(torch.int64)
    n = -(-u // block)
    lo, hi = _block_ranges(ve, block, block)
    m = torch.arange(n, device=dev)[:, None]  # query block
    needed = (m >= lo[None, :]) & (m <= hi[None, :])  # [n_q, n_kv]
    # full tile: every key precedes every query and stays visible past the query block's last row
    padded = torch.nn.functional.pad(ve, (0, n * block - u), value=u + 1)
    min_ve = padded.view(n, block).amin(1)
    b_last = torch.clamp(torch.arange(n, device=dev) * block + block - 1, max=u - 1)
    m0 = torch.arange(n, device=dev) * block
    m1 = torch.clamp(m0 + block, max=u)
    full = (b_last[None, :] <= m0[:, None]) & (min_ve[None, :] >= m1[:, None])
    partial = needed & ~full

    def csr(bits):
        num = bits.sum(-1).to(torch.int32)
        idx = torch.argsort((~bits).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # set bits first
        return num[None, None], idx[None, None]

    last = u - 1

    def mask_mod(b, h, q_idx, kv_idx):
        # flex may call this on padded indices past U; clamp the gather, padded rows are dropped anyway
        return (kv_idx <= q_idx) & (q_idx < ve[torch.clamp(kv_idx, max=last)])

    kv_num, kv_idx = csr(partial)
    full_num, full_idx = csr(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(u, u))


def _tree_attention_flex(q, k, v, visible_end, scale, block_mask=None):
    """FlexAttention path; `block_mask` (a plan's flex_block_mask) may be reused across layers."""
    global _flex_compiled
    from torch.nn.attention import flex_attention as fa

    if block_mask is None:
        block_mask = _flex_block_mask(visible_end)
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, U, D]
    kw = dict(block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    if hasattr(fa, "AuxRequest"):
        kw["return_aux"] = fa.AuxRequest(lse=True)
    else:  # torch < 2.9
        kw["return_lse"] = True
    if q.is_cuda:  # eager flex materialises the full score matrix; the compiled one is the fused kernel
        if _flex_compiled is None:
            _flex_compiled = torch.compile(fa.flex_attention)
        out, aux = _flex_compiled(qt, kt, vt, **kw)
    else:  # inductor's CPU flex has no lse (torch 2.13): run eager, unfused, and say nothing about it
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if not grad:  # torch refuses CPU inputs that require grad even under no_grad
            qt, kt, vt = qt.detach(), kt.detach(), vt.detach()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            try:
                out, aux = fa.flex_attention(qt, kt, vt, **kw)
            except NotImplementedError as e:  # torch 2.13 has no CPU flex backward; say what to use instead
                if not grad:
                    raise
                raise NotImplementedError("tree_attention: backend='flex' has no backward on CPU in this torch "
                                          f"({torch.__version__}); use backend='torch' (the same dense math on CPU) "
                                          "or 'triton' under TRITON_INTERPRET=1") from e
    lse = aux.lse if hasattr(aux, "lse") else aux
    return TreeAttentionOutput(out[0].transpose(0, 1), lse[0].transpose(0, 1).float())


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------
def _visible_end_of(tree) -> torch.Tensor:
    ve = getattr(tree, "visible_end", None)
    if not isinstance(ve, torch.Tensor):
        raise TypeError(f"tree_attention: tree must be a PrefixTrie or have a `visible_end` tensor; got {type(tree)}")
    if ve.dim() != 1 or ve.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tree_attention: tree.visible_end must be a 1-D int32/int64 tensor; got {ve.dtype} "
                         f"of shape {tuple(ve.shape)}")
    return ve


def _check_visible_end_values(ve: torch.Tensor) -> None:
    if ve.numel() == 0:
        return
    rows = torch.arange(ve.numel(), device=ve.device)
    bad = (ve <= rows) | (ve > ve.numel())
    if bool(bad.any()):  # one device sync
        j = int(bad.nonzero()[0])
        raise ValueError(f"tree_attention: tree.visible_end[j] must satisfy j < visible_end[j] <= U = "
                         f"{ve.numel()}; got visible_end[{j}] = {int(ve[j])}")


def tree_attention_plan(
    tree, *, device: torch.device | str | None = None, check_inputs: bool = True, backend: str = "triton"
) -> TreeAttentionPlan:
    """Precompute what tree_attention needs for `tree` (a PrefixTrie or anything with `visible_end`).

    A model calls tree_attention once per layer on the same trie: pass the plan as `tree` to build
    the block lists (one host sync) and the flex BlockMask once instead of per layer.

    Args:
        tree: PrefixTrie (CPU tensors), any object with `visible_end` [U] int32/int64, or a plan
            (returned as is, plus the BlockMask if backend="flex" asks for one it lacks).
        device: where the kernel will run (e.g. "cuda"); default visible_end's device.
        check_inputs: validate visible_end's values (one device sync).
        backend: the tree_attention backend the plan will serve; "flex" also builds the BlockMask.

    Returns:
        TreeAttentionPlan with visible_end [U] int32, both CSR block lists (forward / dQ and the
        transpose for dK / dV) and flex_block_mask (None unless backend="flex"), on the device.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"tree_attention_plan: backend must be one of {_BACKENDS}; got {backend!r}")
    if isinstance(tree, TreeAttentionPlan):
        plan = tree
    else:
        ve = _visible_end_of(tree)
        if device is not None:
            ve = ve.to(device)
        if check_inputs:
            _check_visible_end_values(ve)
        plan = _build_plan(ve, BLOCK_M, BLOCK_N)
    if backend == "flex" and plan.flex_block_mask is None:
        plan = plan._replace(flex_block_mask=_flex_block_mask(plan.visible_end))
    return plan


def _check(q, k, v, ve):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"tree_attention: {name} must be a torch.Tensor; got {type(x)}")
        if x.dim() != 3:
            raise ValueError(f"tree_attention: {name} must be 3-D [U, heads, D]; got shape {tuple(x.shape)}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"tree_attention: {name} must be bf16/fp16/fp32; got {x.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"tree_attention: k and v must have q's dtype {q.dtype}; got k {k.dtype}, v {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"tree_attention: v must have k's shape {tuple(k.shape)}; got {tuple(v.shape)}")
    u, hq, d = q.shape
    if k.shape[0] != u or k.shape[2] != d:
        raise ValueError(f"tree_attention: k must have shape [U, Hkv, D] = [{u}, Hkv, {d}] matching q; "
                         f"got {tuple(k.shape)}")
    if k.shape[1] == 0 or hq % k.shape[1] != 0:
        raise ValueError(f"tree_attention: q's heads must be a multiple of k's heads (GQA); got Hq={hq}, "
                         f"Hkv={k.shape[1]}")
    if ve.shape[0] != u:
        raise ValueError(f"tree_attention: tree.visible_end must have U = {u} rows (q.shape[0]); got {ve.shape[0]}")
    if len({q.device, k.device, v.device, ve.device}) != 1:
        raise ValueError(f"tree_attention: q, k, v and tree.visible_end must share a device; got q {q.device}, "
                         f"k {k.device}, v {v.device}, visible_end {ve.device}")


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    """auto: CUDA -> "triton" for the head dims it supports, else "flex"; CPU -> "torch"."""
    d = q.shape[-1]
    why = None
    if q.is_cuda and d not in GPU_HEAD_DIMS:
        why = f"supports head dim D in {GPU_HEAD_DIMS} on GPU; got D={d}. Use backend='flex' or 'torch'"
    elif d < 16 or d & (d - 1):
        why = f"needs a power-of-2 head dim >= 16; got D={d}"
    return _core.resolve_backend("tree_attention", backend, q.device, choices=_BACKENDS, triton_unsupported=why,
                                 fallback="flex" if q.is_cuda else "torch")


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree,
    *,
    scale: float | None = None,
    backend: str = "auto",
    check_inputs: bool = True,
) -> TreeAttentionOutput:
    """Attention over a prefix trie's packed tokens: causal within a node, full over ancestor nodes.

    Args:
        q: [U, Hq, D] bf16/fp16/fp32, packed in the trie's row order.
        k, v: [U, Hkv, D], q's dtype and device; Hq % Hkv == 0 (GQA: query head h reads KV head
            h // (Hq / Hkv)).
        tree: a PrefixTrie, a TreeAttentionPlan (from `tree_attention_plan`, to reuse block lists and
            the flex BlockMask across layers), or any object with `visible_end` [U] int32/int64. A CPU visible_end is
            copied to q's device (once per call: prefer a plan on the device in a model's layers).
        scale: softmax scale, default D ** -0.5.
        backend: "auto" (CUDA: "triton" for D in GPU_HEAD_DIMS, else "flex"; CPU: "torch"), "triton"
            (CUDA, or CPU under TRITON_INTERPRET=1), "flex" (FlexAttention), "torch" (reference).
        check_inputs: validate visible_end's values (one device sync); False for hot loops.

    q, k, v and visible_end may have any strides. Under torch.autocast, q, k and v are cast to the autocast dtype
    first and the output comes back in it, as scaled_dot_product_attention does; lse stays fp32 (docs/kernels.md).

    Returns:
        TreeAttentionOutput(out [U, Hq, D] in q's dtype, lse [U, Hq] fp32 natural-log logsumexp of
        the scaled scores). Both are differentiable in q, k and v on every backend ("flex": on CUDA).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"tree_attention: backend must be one of {_BACKENDS}; got {backend!r}")
    ve = _visible_end_of(tree)
    q, k, v = _core.autocast_operands(q, k, v)  # as scaled_dot_product_attention under autocast
    on_cuda = isinstance(q, torch.Tensor) and q.is_cuda
    if isinstance(tree, TreeAttentionPlan) and on_cuda and not tree.block_ptr.is_cuda:
        raise ValueError("tree_attention: the TreeAttentionPlan lives on the CPU but q is on CUDA; build it with "
                         "tree_attention_plan(trie, device=q.device)")
    if on_cuda and ve.device.type == "cpu":  # PrefixTrie is built on the host
        ve = ve.to(q.device, non_blocking=True)
    _check(q, k, v, ve)
    backend = _resolve_backend(backend, q)
    if check_inputs and not isinstance(tree, TreeAttentionPlan):  # a plan was checked when it was built
        _check_visible_end_values(ve)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _run_backend(backend, q, k, v, ve, tree, scale)


def _cpu_training(q, k, v) -> bool:
    """CPU tensors that want a gradient, outside the Triton interpreter (which runs the kernels on CPU tensors)."""
    return (q.device.type == "cpu" and not INTERPRET and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad))


@_core.no_autocast  # the inputs are already in the dtype to compute from; the reference's matmuls stay in it
def _run_backend(backend: str, q, k, v, ve, tree, scale: float) -> TreeAttentionOutput:
    if backend == "torch":
        if _cpu_training(q, k, v):
            # training on the CPU: the op's hand-written backward recomputes P once per chunk, where autograd
            # through the reference's checkpointed chunks reruns the whole forward and differentiates it
            plan = tree if isinstance(tree, TreeAttentionPlan) else None
            none = ve.new_empty((0,), dtype=torch.int32)
            out, lse = _tree_attention_op(q, k, v, ve, none if plan is None else plan.block_ptr,
                                          none if plan is None else plan.block_idx, scale, BLOCK_M, BLOCK_N)
            return TreeAttentionOutput(out, lse)
        return tree_attention_ref(q, k, v, ve, scale=scale)
    if backend == "flex":
        if q.shape[0] == 0:
            return TreeAttentionOutput(torch.empty_like(q), q.new_empty((0, q.shape[1]), dtype=torch.float32))
        mask = tree.flex_block_mask if isinstance(tree, TreeAttentionPlan) else None
        return _tree_attention_flex(q, k, v, ve, scale, block_mask=mask)
    plan = tree if isinstance(tree, TreeAttentionPlan) else _build_plan(ve, BLOCK_M, BLOCK_N)
    q, k, v = (_core.unit_stride_last(x) for x in (q, k, v))  # the kernel's one layout need (any other strides)
    out, lse = _tree_attention_op(q, k, v, plan.visible_end, plan.block_ptr, plan.block_idx, scale,
                                  plan.block_m, plan.block_n, plan.q_block_ptr, plan.q_block_idx)
    return TreeAttentionOutput(out, lse)
