"""Tree attention backward: gradients of q, k, v (and through lse) over the prefix-trie mask.

Flash-attention-2 style, in three kernels, all fp32 accumulation (`tree_attention.py` holds the forward,
the plan and the op registration):

1. `_tree_attention_bwd_preprocess_kernel`: delta[i, h] = sum_d dO[i, h, d] * O[i, h, d] - dlse[i, h].
   With P = softmax(S) and lse = logsumexp(S), dL/dS = P * (dP - delta) where dP = dO V^T; the lse
   output adds dlse * P, which is why it folds into delta for free.
2. `_tree_attention_bwd_dkdv_kernel`: one program per (KV block, KV head). It visits only the query
   blocks listed for that KV block in the plan's transposed CSR (q_block_ptr / q_block_idx) and, for
   GQA, every query head of the KV head, so dK and dV sum over them in registers: no atomics.
3. `_tree_attention_bwd_dq_kernel`: one program per (query block, query head), over the KV blocks of
   the forward's CSR (block_ptr / block_idx).

P is recomputed from the saved logsumexp in both loops; the attention matrix is never stored. dQ has its
own kernel rather than fp32 atomics from the dK/dV loop: no bf16 atomics, a deterministic result, and
no [U, Hq, D] fp32 scratch; the cost is computing Q K^T twice.

`_tree_attention_bwd_torch` is the same math in PyTorch, chunked over query rows (the op's CPU path).
"""

from __future__ import annotations

import torch

from credit_kernels._core import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

# Not tuned on a card (no GPU was available when this was written): the plan's 64 x 64 tiles, 4 warps and
# 2 stages as the forward.
BWD_NUM_WARPS = 4
BWD_NUM_STAGES = 2
_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _tree_attention_bwd_preprocess_kernel(
        o_ptr, do_ptr, dlse_ptr, delta_ptr,
        U,
        stride_o_u, stride_o_h, stride_do_u, stride_do_h, stride_dlse_u, stride_dlse_h, stride_delta_u,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
    ):  # fmt: skip
        """delta [U, Hq] fp32 = rowsum(dO * O) - dlse; o/do: [U, Hq, HEAD_DIM], last dim contiguous."""
        pid_m = tl.program_id(0)
        pid_h = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < U
        rows = offs_m.to(tl.int64)
        o = tl.load(o_ptr + (rows * stride_o_u + pid_h * stride_o_h)[:, None] + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0).to(tl.float32)
        do = tl.load(do_ptr + (rows * stride_do_u + pid_h * stride_do_h)[:, None] + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0).to(tl.float32)
        delta = tl.sum(o * do, 1)
        if HAS_DLSE:
            delta -= tl.load(dlse_ptr + rows * stride_dlse_u + pid_h * stride_dlse_h, mask=row_ok, other=0.0)
        tl.store(delta_ptr + rows * stride_delta_u + pid_h, delta, mask=row_ok)

    @triton.jit
    def _tree_attention_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, ve_ptr, q_block_ptr_ptr, q_block_idx_ptr, dk_ptr, dv_ptr,
        U, sm_scale, qk_scale,
        stride_q_u, stride_q_h, stride_k_u, stride_k_h, stride_v_u, stride_v_h, stride_do_u, stride_do_h,
        stride_lse_u, stride_lse_h, stride_delta_u, stride_dk_u, stride_dk_h, stride_dv_u, stride_dv_h,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One program: dK, dV for BLOCK_N key rows of one KV head, summed over its GROUP query heads.

        q/do: [U, Hq, HEAD_DIM]; k/v/dk/dv: [U, Hkv, HEAD_DIM], last dim contiguous; lse (natural log)
        and delta: [U, Hq] fp32; ve: [U] int32; q_block_ptr: [num_n_blocks + 1], q_block_idx: the query
        blocks that see each KV block. qk_scale = sm_scale * log2(e): P = exp2(S * qk_scale - lse * log2(e)).
        """
        pid_n = tl.program_id(0)
        kv_h = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        col_ok = offs_n < U
        cols = offs_n.to(tl.int64)  # int64 row offsets: U * H * D passes 2^31 for long packed batches
        k = tl.load(k_ptr + (cols * stride_k_u + kv_h * stride_k_h)[:, None] + offs_d[None, :],
                    mask=col_ok[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
        v = tl.load(v_ptr + (cols * stride_v_u + kv_h * stride_v_h)[:, None] + offs_d[None, :],
                    mask=col_ok[:, None], other=0.0)
        ve = tl.load(ve_ptr + offs_n, mask=col_ok, other=0)  # 0: padded keys are visible to no row
        if UPCAST_DOT:  # the Triton interpreter's bf16/fp16 tl.dot is wrong: upcast
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

        start = tl.load(q_block_ptr_ptr + pid_n)
        end = tl.load(q_block_ptr_ptr + pid_n + 1)
        for g in range(GROUP):  # GQA: query heads kv_h * GROUP + g share this KV head
            h = kv_h * GROUP + g
            # 1. visit only the query blocks that see this KV block (the plan's transposed CSR row)
            for t in range(start, end):
                mb = tl.load(q_block_idx_ptr + t)
                offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
                row_ok = offs_m < U
                rows = offs_m.to(tl.int64)
                q = tl.load(q_ptr + (rows * stride_q_u + h * stride_q_h)[:, None] + offs_d[None, :],
                            mask=row_ok[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
                do = tl.load(do_ptr + (rows * stride_do_u + h * stride_do_h)[:, None] + offs_d[None, :],
                             mask=row_ok[:, None], other=0.0)
                lse = tl.load(lse_ptr + rows * stride_lse_u + h * stride_lse_h, mask=row_ok, other=0.0)
                delta = tl.load(delta_ptr + rows * stride_delta_u + h, mask=row_ok, other=0.0)
                if UPCAST_DOT:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)

                # 2. P^T recomputed from lse, exact element mask (j <= i) & (i < visible_end[j])
                s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
                visible = (offs_n[:, None] <= offs_m[None, :]) & (offs_m[None, :] < ve[:, None])
                p_t = tl.exp2(s_t * qk_scale - (lse * 1.4426950408889634)[None, :])
                p_t = tl.where(visible, p_t, 0.0)

                # 3. dV += P^T dO; dS^T = P^T * (dP^T - delta); dK += dS^T Q (scaled at the end)
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
                ds_t = p_t * (dp_t - delta[None, :])
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

        dk *= sm_scale
        tl.store(dk_ptr + (cols * stride_dk_u + kv_h * stride_dk_h)[:, None] + offs_d[None, :],
                 dk.to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
        tl.store(dv_ptr + (cols * stride_dv_u + kv_h * stride_dv_h)[:, None] + offs_d[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])

    @triton.jit
    def _tree_attention_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, ve_ptr, block_ptr_ptr, block_idx_ptr, dq_ptr,
        U, sm_scale, qk_scale,
        stride_q_u, stride_q_h, stride_k_u, stride_k_h, stride_v_u, stride_v_h, stride_do_u, stride_do_h,
        stride_lse_u, stride_lse_h, stride_delta_u, stride_dq_u, stride_dq_h,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One program: dQ for BLOCK_M query rows of one query head, over the KV blocks the forward visited.

        Layouts as in the dK/dV kernel; block_ptr / block_idx: the forward's CSR (per query block).
        """
        pid_m = tl.program_id(0)
        pid_h = tl.program_id(1)
        kv_h = pid_h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < U
        rows = offs_m.to(tl.int64)
        q = tl.load(q_ptr + (rows * stride_q_u + pid_h * stride_q_h)[:, None] + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        do = tl.load(do_ptr + (rows * stride_do_u + pid_h * stride_do_h)[:, None] + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(lse_ptr + rows * stride_lse_u + pid_h * stride_lse_h, mask=row_ok, other=0.0)
        lse2 = lse2 * 1.4426950408889634  # natural log -> base 2
        delta = tl.load(delta_ptr + rows * stride_delta_u + pid_h, mask=row_ok, other=0.0)
        if UPCAST_DOT:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        start = tl.load(block_ptr_ptr + pid_m)
        end = tl.load(block_ptr_ptr + pid_m + 1)
        for t in range(start, end):
            nb = tl.load(block_idx_ptr + t)
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = offs_n < U
            cols = offs_n.to(tl.int64)
            k = tl.load(k_ptr + (cols * stride_k_u + kv_h * stride_k_h)[:, None] + offs_d[None, :],
                        mask=col_ok[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
            v = tl.load(v_ptr + (cols * stride_v_u + kv_h * stride_v_h)[:, None] + offs_d[None, :],
                        mask=col_ok[:, None], other=0.0)
            ve = tl.load(ve_ptr + offs_n, mask=col_ok, other=0)
            if UPCAST_DOT:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < ve[None, :])
            p = tl.where(visible, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

        dq *= sm_scale
        tl.store(dq_ptr + (rows * stride_dq_u + pid_h * stride_dq_h)[:, None] + offs_d[None, :],
                 dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------
def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _tree_attention_bwd(
    grad_out, grad_lse, q, k, v, out, lse, visible_end, block_ptr, block_idx, q_block_ptr, q_block_idx,
    scale: float, block_m: int, block_n: int, needs_dq: bool, needs_dkv: bool, interpret: bool,
):  # fmt: skip
    """Launch the backward kernels. Returns (dq [U, Hq, D] or None, dk, dv [U, Hkv, D] or None), contiguous.

    grad_out [U, Hq, D] in q's dtype, grad_lse [U, Hq] or None; q, k, v, out, lse as in the forward;
    the plan's two CSRs; interpret: running under TRITON_INTERPRET=1 (upcast bf16/fp16 dots).
    """
    u, hq, d = q.shape
    hkv = k.shape[1]
    q, k, v, out, grad_out = (_last_dim_contiguous(x) for x in (q, k, v, out, grad_out))
    dq = torch.empty((u, hq, d), dtype=q.dtype, device=q.device) if needs_dq else None
    dk = torch.empty((u, hkv, d), dtype=k.dtype, device=k.device) if needs_dkv else None
    dv = torch.empty((u, hkv, d), dtype=v.dtype, device=v.device) if needs_dkv else None
    if u == 0 or not (needs_dq or needs_dkv):
        return dq, dk, dv
    lse = lse.float()
    delta = torch.empty((u, hq), dtype=torch.float32, device=q.device)
    has_dlse = grad_lse is not None
    dlse = grad_lse.float() if has_dlse else delta  # a placeholder pointer when HAS_DLSE is off
    _tree_attention_bwd_preprocess_kernel[(triton.cdiv(u, block_m), hq)](
        out, grad_out, dlse, delta, u,
        out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1), dlse.stride(0), dlse.stride(1),
        delta.stride(0),
        HEAD_DIM=d, BLOCK_M=block_m, HAS_DLSE=has_dlse,
    )  # fmt: skip
    common = dict(
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
        UPCAST_DOT=interpret and q.dtype != torch.float32,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # as the forward: fp32 gets no TF32 rounding
        num_warps=BWD_NUM_WARPS, num_stages=BWD_NUM_STAGES,
    )  # fmt: skip
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               grad_out.stride(0), grad_out.stride(1), lse.stride(0), lse.stride(1), delta.stride(0))
    if needs_dkv:
        _tree_attention_bwd_dkdv_kernel[(q_block_ptr.numel() - 1, hkv)](
            q, k, v, grad_out, lse, delta, visible_end, q_block_ptr, q_block_idx, dk, dv,
            u, scale, scale * _LOG2E, *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), **common,
        )  # fmt: skip
    if needs_dq:
        _tree_attention_bwd_dq_kernel[(block_ptr.numel() - 1, hq)](
            q, k, v, grad_out, lse, delta, visible_end, block_ptr, block_idx, dq,
            u, scale, scale * _LOG2E, *strides, dq.stride(0), dq.stride(1), **common,
        )  # fmt: skip
    return dq, dk, dv


def _tree_attention_bwd_torch(grad_out, grad_lse, q, k, v, out, lse, visible_end, scale: float,
                              chunk_rows: int | None = None):
    """The backward kernels' math in PyTorch, chunked over query rows (the op's CPU path and a second oracle).

    Each chunk recomputes P for its visible keys from lse, so memory stays at one chunk's scores, as in
    `tree_attention_ref`. Computes in fp32 (fp64 stays fp64); returns (dq, dk, dv) in the inputs' dtypes.
    """
    u, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    c = chunk_rows if chunk_rows is not None else max(1, min(256, (64 << 20) // max(1, hq * u)))
    ve = visible_end.to(device=q.device, dtype=torch.int64)
    kc, vc = k.to(cdt).transpose(0, 1), v.to(cdt).transpose(0, 1)  # [Hkv, U, D]
    dq = torch.zeros((u, hq, d), dtype=cdt, device=q.device)
    dk = torch.zeros((hkv, u, d), dtype=cdt, device=q.device)
    dv = torch.zeros((hkv, u, d), dtype=cdt, device=q.device)
    delta = (grad_out.to(cdt) * out.to(cdt)).sum(-1)  # [U, Hq]
    if grad_lse is not None:
        delta = delta - grad_lse.to(cdt)
    for a in range(0, u, c):
        b = min(u, a + c)
        n = b - a
        keys = torch.nonzero(ve[:b] > a).squeeze(1)  # the keys some row in [a, b) sees
        nk = keys.numel()
        qc = q[a:b].to(cdt).transpose(0, 1).reshape(hkv, group * n, d)  # heads h = kv * group + g
        doc = grad_out[a:b].to(cdt).transpose(0, 1).reshape(hkv, group * n, d)
        kk, vk = kc[:, keys], vc[:, keys]  # [Hkv, nk, D]
        s = (qc @ kk.transpose(1, 2)).view(hkv, group, n, nk) * scale
        i = torch.arange(a, b, device=q.device)[:, None]
        visible = (keys[None, :] <= i) & (i < ve[keys][None, :])
        lse_c = lse[a:b].to(cdt).transpose(0, 1).reshape(hkv, group, n, 1)
        p = torch.exp(s - lse_c).masked_fill(~visible, 0.0)
        dp = (doc @ vk.transpose(1, 2)).view(hkv, group, n, nk)
        delta_c = delta[a:b].transpose(0, 1).reshape(hkv, group, n, 1)
        ds = (p * (dp - delta_c)).view(hkv, group * n, nk)
        p = p.view(hkv, group * n, nk)
        dq[a:b] = (ds @ kk).view(hq, n, d).transpose(0, 1) * scale
        dk.index_add_(1, keys, ds.transpose(1, 2) @ qc * scale)
        dv.index_add_(1, keys, p.transpose(1, 2) @ doc)
    return dq.to(q.dtype), dk.transpose(0, 1).to(k.dtype), dv.transpose(0, 1).to(v.dtype)
