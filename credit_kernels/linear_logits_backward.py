"""The backward shared by linear_topk and linear_gather: op `credit::linear_logits_backward`.

With z = hidden @ weight.T / T, log p = (z - row_max) - log_norm (the forward's two row statistics, kept apart:
credit_kernels/_triton_utils.py), the gradient w.r.t. the logits of both ops has one form:

    dz[i, v] = coef[i] p[i, v] + coef_rest[i] exp(min((z - row_max) - rest_shift, 0))   for v not in ids[i]
    dz[i, v] = fix[i, j]                                                                  for v = ids[i, j]

(all over T): a dense part from per-row coefficients and a few entries at the ids, computed on the host in fp32
from the saved log-probs (so bf16 dz is rounded once). The rest term is linear_gather's tail (rest_shift =
logsumexp of the non-gathered logits - row_max, +inf for no tail gradient); linear_topk passes None. Then
d hidden = dz W and d weight = dz^T h, one row chunk at a time.

Backends: triton (the dz kernel below + two matmuls), cpp (csrc/linear_topk.cpp, linear_logits_bwd), torch
(credit_kernels.reference.linear_logits_bwd_ref).
"""

from __future__ import annotations

from typing import Optional

import torch

from credit_kernels import _core
from credit_kernels import _triton_utils as tu
from credit_kernels._core import HAS_TRITON
from credit_kernels.reference import linear_logits_bwd_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    from credit_kernels._triton_utils import grouped_pid, logit_tile

    @triton.jit
    def _linear_logits_dz_kernel(
        hidden_ptr, weight_ptr, row_max_ptr, log_norm_ptr, coef_ptr, rest_shift_ptr, coef_rest_ptr, dz_ptr,
        N, V, D, inv_temp,
        stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d, stride_dz_n,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
        HAS_REST: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """Dense part of dz = d loss / d (hidden @ weight.T) for one [BLOCK_N, BLOCK_V] tile, in dz's dtype.

        row_max, log_norm, coef, rest_shift, coef_rest: [N] fp32. With s = z - row_max:
            dz = (coef exp(s - log_norm) + coef_rest exp(min(s - rest_shift, 0))) / T.
        The min only matters at gathered ids (z may exceed the rest's logsumexp there), which the host overwrites.
        """
        num_v_tiles = tl.cdiv(V, BLOCK_V)
        pid_n, pid_v = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_v_tiles, GROUP_N)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_n = offs_n < N
        mask_v = offs_v < V
        z = logit_tile(
            hidden_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, D,
            stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d,
            BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, INPUT_PRECISION,
        ) * inv_temp
        shifted = z - tl.load(row_max_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
        log_norm = tl.load(log_norm_ptr + offs_n, mask=mask_n, other=0.0)
        coef = tl.load(coef_ptr + offs_n, mask=mask_n, other=0.0)
        dz = coef[:, None] * tl.exp(shifted - log_norm[:, None])
        if HAS_REST:
            rest_shift = tl.load(rest_shift_ptr + offs_n, mask=mask_n, other=0.0)
            coef_rest = tl.load(coef_rest_ptr + offs_n, mask=mask_n, other=0.0)
            dz += coef_rest[:, None] * tl.exp(tl.minimum(shifted - rest_shift[:, None], 0.0))
        dz_ptrs = dz_ptr + offs_n.to(tl.int64)[:, None] * stride_dz_n + offs_v[None, :]
        tl.store(dz_ptrs, (dz * inv_temp).to(dz_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


def _linear_logits_bwd_triton(hidden, weight, ids, fix, row_max, log_norm, coef, rest_shift, coef_rest, temperature,
                              needs_dh, needs_dw):
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    cfg = tu.logits_config(dev, min(tu.bwd_chunk_rows(n, vocab, hidden.element_size()), n), "dz")
    fix_dz = (fix / temperature).to(hidden.dtype)  # the entries at the ids, rounded once
    has_rest = rest_shift is not None

    def write_dz(sl, h, dz):
        rows = h.shape[0]
        grid = (triton.cdiv(rows, cfg["BLOCK_N"]) * triton.cdiv(vocab, cfg["BLOCK_V"]),)
        _linear_logits_dz_kernel[grid](
            h, weight, row_max[sl], log_norm[sl], coef[sl], rest_shift[sl] if has_rest else coef,
            coef_rest[sl] if has_rest else coef, dz, rows, vocab, d, 1.0 / temperature,
            h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
            BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], GROUP_N=cfg["GROUP_N"],
            HAS_REST=has_rest, **tu.dot_flags(dev, hidden.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        dz.scatter_(1, ids[sl], fix_dz[sl])

    return tu.chunked_linear_backward(hidden, weight, needs_dh, needs_dw, write_dz)


@torch.library.custom_op("credit::linear_logits_backward", mutates_args=())
@_core.no_autocast
def _linear_logits_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    fix: torch.Tensor,
    row_max: torch.Tensor,
    log_norm: torch.Tensor,
    coef: torch.Tensor,
    rest_shift: Optional[torch.Tensor],
    coef_rest: Optional[torch.Tensor],
    temperature: float,
    backend: str,
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_hidden [N, d] or [0], d_weight [V, d] or [0]); ids [N, k] int64, fix [N, k] and the [N] rows fp32."""
    empty_h, empty_w = hidden.new_empty((0,)), weight.new_empty((0,))
    if hidden.shape[0] == 0:
        return (torch.zeros_like(hidden) if needs_hidden_grad else empty_h,
                torch.zeros_like(weight) if needs_weight_grad else empty_w)
    args = (hidden, weight, ids, fix, row_max, log_norm, coef, rest_shift, coef_rest, temperature)
    if backend == "cpp":
        return torch.ops.credit_C.linear_logits_bwd(*args, needs_hidden_grad, needs_weight_grad, 0)
    if backend == "torch":
        dh, dw = linear_logits_bwd_ref(*args[:-1], temperature=temperature, needs_hidden_grad=needs_hidden_grad,
                                       needs_weight_grad=needs_weight_grad)
    else:
        dh, dw = _linear_logits_bwd_triton(*args, needs_hidden_grad, needs_weight_grad)
    return (dh if dh is not None else empty_h, dw if dw is not None else empty_w)


@_linear_logits_backward_op.register_fake
def _(hidden, weight, ids, fix, row_max, log_norm, coef, rest_shift, coef_rest, temperature, backend,
      needs_hidden_grad, needs_weight_grad):
    return (hidden.new_empty(hidden.shape if needs_hidden_grad else (0,)),
            weight.new_empty(weight.shape if needs_weight_grad else (0,)))


def linear_logits_backward(hidden, weight, ids, fix, row_max, log_norm, coef, rest_shift, coef_rest, temperature,
                           backend, needs_dh, needs_dw):
    """d hidden and d weight for the dz of the module docstring (None where not needed)."""
    d_hidden, d_weight = _linear_logits_backward_op(
        hidden, weight, ids, fix, row_max, log_norm, coef, rest_shift, coef_rest, temperature, backend, needs_dh,
        needs_dw,
    )
    return d_hidden if needs_dh else None, d_weight if needs_dw else None
