"""Top-k tokens of softmax(hidden @ weight.T / T) with their log-probs, without the N x V logits.

    z = hidden @ weight.T / temperature          [N, V], never stored whole
    ids[i]  = the k largest z[i, :], by value descending; equal values: the smaller token id first
    logp[i, j] = z[i, ids[i, j]] - lse[i]        fp32, lse[i] = logsumexp(z[i])

This is the student's top-k (+ tail) of SDPO's logit-level loss and of CREDIT's contrastive teacher at
logit level (../shared/CREDIT.md, "Logit-level variant"); `linear_gather` (linear_gather.py) scores the
teacher at the same ids. Gradients flow to hidden and weight through logp and lse (ids are integers):
    d logp[i, j] / dz = onehot(ids[i, j]) - p,   d lse[i] / dz = p.

Backends (custom op `credit::linear_topk`, autograd through `credit::linear_logits_backward`, shared
with `credit::linear_gather`):
    triton  CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests); k <= TRITON_MAX_K.
    cpp     the compiled CPU kernel in csrc/linear_topk.cpp (chunked, multi-threaded).
    torch   credit_kernels.reference.linear_topk_ref (chunked PyTorch), the oracle.

Triton schedule (forward): the (row block, vocabulary split) grid and online logsumexp of
linear_logprob. Each program also keeps, per row, its k best logits so far as int64 sort keys in
registers: the high half the fp32 bits made order-preserving, the low half ~id, so one integer compare
ranks by value and breaks ties towards the smaller id, and every key is unique. A tile whose row maxima
all fall below the rows' current k-th best key (the common case once a few tiles are in) costs one
compare; otherwise its candidates above the threshold are inserted one by one, largest first, each
replacing the row's current minimum (for logits in random vocabulary order a row sees about
k (1 + ln(n / k)) insertions over n scanned entries, so after the first tiles most tiles insert none).
Each (row, split) writes its k keys; torch.topk over the [N, splits * k] candidates and a decode finish
(memory O(N * splits * k)). tl.sort / tl.topk are not used: the interpreter runs their bitonic networks
at seconds per tile, and they would sort every tile.
Backward (both ops): per row chunk, one kernel recomputes the logit tiles and writes the dense part of
dz (coef p, plus coef_rest exp(z - lse_rest) for linear_gather's tail), the host writes the few entries
at the ids (computed in fp32 from the saved log-probs, so bf16 dz is rounded once), then two matmuls
give d hidden and d weight as in linear_logprob.
"""

from __future__ import annotations

import importlib
import math
import operator
from typing import NamedTuple, Optional

import torch

from credit_kernels import _ext
from credit_kernels.linear_logprob import (
    HAS_TRITON,
    SUPPORTED_DTYPES,
    _bwd_chunk_rows,
    _config,
    _dot_flags,
    _num_splits,
    _scratch,
    chunked_linear_backward,
    resolve_backend,
)
from credit_kernels.reference import _row_chunk, linear_topk_ref

# the module (credit_kernels re-exports a function of the same name): its POISON switch is shared
_ll = importlib.import_module("credit_kernels.linear_logprob")

if HAS_TRITON:
    import triton
    import triton.language as tl

    from credit_kernels.linear_logprob import _grouped_pid, _logit_tile

# The per-row buffer lives in registers ([BLOCK_N, next_pow2(k)] int64); SDPO uses k = 20 or 100.
# Larger k runs the torch backend under backend="auto".
TRITON_MAX_K = 128

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    _MIN_KEY = tl.constexpr(-(2**63) + 1)  # padding columns: below every real key and every sentinel
    _MAX_KEY = tl.constexpr(2**63 - 1)  # buffer slots j >= k: never the row minimum, never replaced
    # key of -inf with low half 0: slot j starts at _NEG_INF_KEY + j (distinct, so one slot is the minimum)
    _NEG_INF_KEY = tl.constexpr(-2139095041 * 2**32)

    @triton.jit
    def _topk_keys(z, offs_v, mask_v):
        """int64 keys of a [BLOCK_N, BLOCK_V] fp32 tile: larger key = larger z, or equal z and smaller id."""
        bits = z.to(tl.int32, bitcast=True)
        k32 = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negative floats: larger magnitude, smaller key
        k32 = tl.where(z == 0.0, 0, k32)  # -0.0 ranks as +0.0
        low = (~offs_v).to(tl.uint32, bitcast=True).to(tl.int64)  # 2^32 - 1 - id, zero-extended
        keys = (k32.to(tl.int64) << 32) | low[None, :]
        return tl.where(mask_v[None, :], keys, _MIN_KEY)

    @triton.jit
    def _key_value(key):
        """The fp32 logit a key encodes (inverse of the high half of _topk_keys)."""
        k32 = (key >> 32).to(tl.int32)
        bits = tl.where(k32 >= 0, k32, k32 ^ 0x7FFFFFFF)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _linear_topk_fwd_kernel(
        hidden_ptr, weight_ptr, part_max_ptr, part_sum_ptr, part_key_ptr,
        N, V, D, K, inv_temp, tiles_per_split, num_splits,
        stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
        K_PAD: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """Partials of one (row block, vocabulary split).

        hidden [N, D], weight [V, D] (bf16/fp16/fp32); K <= K_PAD (a power of 2).
        Writes, fp32, at [row, split]: part_max = m, part_sum = sum exp(z - m); and int64 at
        [row, split, 0:K] the keys of the split's K best logits of the row (unordered).
        """
        pid_n, pid_s = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, GROUP_N)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        v_lo = pid_s * tiles_per_split * BLOCK_V
        n_tiles = tl.minimum(tiles_per_split, tl.cdiv(V - v_lo, BLOCK_V))  # >= 1 by construction
        offs_k = tl.arange(0, K_PAD)

        m_i = tl.full((BLOCK_N,), -1.0e30, dtype=tl.float32)
        s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
        best = tl.where(offs_k[None, :] < K, _NEG_INF_KEY + offs_k[None, :].to(tl.int64), _MAX_KEY)
        best = best + tl.zeros((BLOCK_N, K_PAD), dtype=tl.int64)
        theta = tl.min(best, axis=1)  # the row's K-th best key so far
        theta_f = _key_value(theta)  # ... and its logit (-inf while the buffer is not full)
        for tile in range(0, n_tiles):
            offs_v = v_lo + tile * BLOCK_V + tl.arange(0, BLOCK_V)
            mask_v = offs_v < V
            z = _logit_tile(
                hidden_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, D,
                stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d,
                BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, INPUT_PRECISION,
            ) * inv_temp
            z = tl.where(mask_v[None, :], z, float("-inf"))
            # 1. online logsumexp, as in linear_logprob
            z_max = tl.max(z, axis=1)
            m_new = tl.maximum(m_i, z_max)
            s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m_i = m_new
            # 2. top-k: only when some row's tile maximum reaches its threshold (>=: an equal logit with a
            #    smaller id still wins)
            if tl.max(((z_max >= theta_f) & mask_n).to(tl.int32), axis=0) > 0:
                cand = _topk_keys(z, offs_v, mask_v)
                cand = tl.where(mask_n[:, None] & (cand > theta[:, None]), cand, _MIN_KEY)
                c = tl.max(cand, axis=1)
                # 3. insert the largest remaining candidate of every row in place of the row's minimum,
                #    until no row has a candidate above its (rising) threshold
                while tl.max((c > theta).to(tl.int32), axis=0) > 0:
                    slot = (best == theta[:, None]) & (c > theta)[:, None]
                    best = tl.where(slot, c[:, None], best)
                    cand = tl.where(cand == c[:, None], _MIN_KEY, cand)
                    theta = tl.min(best, axis=1)
                    c = tl.max(cand, axis=1)
                theta_f = _key_value(theta)

        part = offs_n.to(tl.int64) * num_splits + pid_s  # int64: N * splits * K can pass 2^31
        tl.store(part_max_ptr + part, m_i, mask=mask_n)
        tl.store(part_sum_ptr + part, s_i, mask=mask_n)
        key_ptrs = part_key_ptr + part[:, None] * K + offs_k[None, :]
        tl.store(key_ptrs, best, mask=mask_n[:, None] & (offs_k[None, :] < K))

    @triton.jit
    def _linear_logits_dz_kernel(
        hidden_ptr, weight_ptr, lse_ptr, coef_ptr, lse_rest_ptr, coef_rest_ptr, dz_ptr,
        N, V, D, inv_temp,
        stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d, stride_dz_n,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
        HAS_REST: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """Dense part of dz = d loss / d (hidden @ weight.T) for one [BLOCK_N, BLOCK_V] tile, in dz's dtype.

        lse, coef, lse_rest, coef_rest: [N] fp32. With p = exp(z - lse):
            dz = (coef p + coef_rest exp(min(z - lse_rest, 0))) / T.
        The min only matters at gathered ids (z may exceed lse_rest there), which the host overwrites.
        """
        num_v_tiles = tl.cdiv(V, BLOCK_V)
        pid_n, pid_v = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_v_tiles, GROUP_N)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_n = offs_n < N
        mask_v = offs_v < V
        z = _logit_tile(
            hidden_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, D,
            stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d,
            BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, INPUT_PRECISION,
        ) * inv_temp
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        coef = tl.load(coef_ptr + offs_n, mask=mask_n, other=0.0)
        dz = coef[:, None] * tl.exp(z - lse[:, None])
        if HAS_REST:
            lse_rest = tl.load(lse_rest_ptr + offs_n, mask=mask_n, other=0.0)
            coef_rest = tl.load(coef_rest_ptr + offs_n, mask=mask_n, other=0.0)
            dz += coef_rest[:, None] * tl.exp(tl.minimum(z - lse_rest[:, None], 0.0))
        dz_ptrs = dz_ptr + offs_n.to(tl.int64)[:, None] * stride_dz_n + offs_v[None, :]
        tl.store(dz_ptrs, (dz * inv_temp).to(dz_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _key_scratch(shape, *, device) -> torch.Tensor:
    # int64 has no NaN: poison with the largest key, which would win the final topk and decode to NaN
    if _ll.POISON:
        return torch.full(shape, 2**63 - 1, dtype=torch.int64, device=device)
    return torch.empty(shape, dtype=torch.int64, device=device)


def _decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys of _topk_keys -> (fp32 logits, int64 ids)."""
    k32 = (keys >> 32).to(torch.int32)
    bits = torch.where(k32 >= 0, k32, k32 ^ 0x7FFFFFFF)
    return bits.view(torch.float32), 4294967295 - (keys & 4294967295)


def _topk_config(device: torch.device, dtype: torch.dtype, n: int, kernel: str) -> dict:
    """linear_logprob's config, adapted per kernel ("topk", "gather" forward; "dz" backward)."""
    cfg = _config(device, dtype, "dz")  # the 128 x 128 base; each kernel narrows it below
    if device.type != "cuda":
        # interpreter: its cost is per tile visited, so few rows get wider tiles of the same size
        block_n = min(64, max(16, triton.next_power_of_2(n)))
        cfg.update(BLOCK_N=block_n, BLOCK_V=65536 // block_n)
    elif kernel == "topk":
        # the [BLOCK_N, K_PAD] int64 buffer shares registers with the logit tile. ptxas (Triton 3.8, sm_90,
        # bf16, K_PAD = 128, compiled offline) spills at 64 x 128 x 8 warps (200 B) and not at 64 x 64.
        # Not yet timed on a card.
        cfg.update(BLOCK_N=64, BLOCK_V=64, num_warps=8)
    elif kernel == "gather":
        # same check: 128 x 128 spills 592 B (the walk and the second logsumexp), 64 x 128 none. Not timed.
        cfg.update(BLOCK_N=64, BLOCK_V=128, num_warps=8)
    return cfg


def _combine_lse(part_max: torch.Tensor, part_sum: torch.Tensor) -> torch.Tensor:
    """[N, S] partials (max, sum exp(z - max)) -> [N] logsumexp; -inf where every sum is 0."""
    row_max = part_max.max(dim=1).values
    total = (part_sum * torch.exp(part_max - row_max[:, None])).sum(dim=1)
    return row_max + torch.log(total)


def _split_plan(n: int, vocab: int, cfg: dict, device: torch.device) -> tuple[int, int, int]:
    n_blocks, v_tiles = triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(vocab, cfg["BLOCK_V"])
    tiles_per_split = triton.cdiv(v_tiles, _num_splits(n_blocks, v_tiles, device))
    return n_blocks, tiles_per_split, triton.cdiv(v_tiles, tiles_per_split)  # every split holds >= 1 tile


def _linear_topk_fwd_triton(hidden, weight, k, temperature):
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    cfg = _topk_config(dev, hidden.dtype, n, "topk")
    n_blocks, tiles_per_split, num_splits = _split_plan(n, vocab, cfg, dev)
    f32 = dict(dtype=torch.float32, device=dev)
    part_max = _scratch((n, num_splits), **f32)
    part_sum = _scratch((n, num_splits), **f32)
    part_key = _key_scratch((n, num_splits, k), device=dev)
    _linear_topk_fwd_kernel[(n_blocks * num_splits,)](
        hidden, weight, part_max, part_sum, part_key,
        n, vocab, d, k, 1.0 / temperature, tiles_per_split, num_splits,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], GROUP_N=cfg["GROUP_N"],
        K_PAD=max(16, triton.next_power_of_2(k)), **_dot_flags(dev, hidden.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    lse = _combine_lse(part_max, part_sum)
    # keys are unique, so this merge is deterministic; sorted=True gives the ranking order
    top = part_key.view(n, num_splits * k).topk(k, dim=1).values
    values, ids = _decode_keys(top)
    return ids, values - lse[:, None], lse


def _linear_logits_bwd_triton(hidden, weight, ids, fix, lse, coef, lse_rest, coef_rest, temperature,
                              needs_dh, needs_dw):
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    cfg = _topk_config(dev, hidden.dtype, min(_bwd_chunk_rows(n, vocab, hidden.element_size()), n), "dz")
    fix_dz = (fix / temperature).to(hidden.dtype)  # the entries at the ids, rounded once
    has_rest = lse_rest is not None

    def write_dz(sl, h, dz):
        rows = h.shape[0]
        grid = (triton.cdiv(rows, cfg["BLOCK_N"]) * triton.cdiv(vocab, cfg["BLOCK_V"]),)
        _linear_logits_dz_kernel[grid](
            h, weight, lse[sl], coef[sl], lse_rest[sl] if has_rest else lse, coef_rest[sl] if has_rest else coef,
            dz, rows, vocab, d, 1.0 / temperature,
            h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
            BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], GROUP_N=cfg["GROUP_N"],
            HAS_REST=has_rest, **_dot_flags(dev, hidden.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        dz.scatter_(1, ids[sl], fix_dz[sl])

    return chunked_linear_backward(hidden, weight, needs_dh, needs_dw, write_dz)


def _linear_logits_bwd_torch(hidden, weight, ids, fix, lse, coef, lse_rest, coef_rest, temperature,
                             needs_dh, needs_dw):
    """The same dz as the Triton path, chunked in fp32 (fp64 for fp64 inputs): the oracle backward."""
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = weight.to(acc)
    d_hidden = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if needs_dh else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_dw else None
    step = _row_chunk(n, vocab, None)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        h = hidden[rows].to(acc)
        z = (h @ w.T) / temperature
        dz = coef[rows, None].to(acc) * torch.exp(z - lse[rows, None].to(acc))
        if lse_rest is not None:
            dz += coef_rest[rows, None].to(acc) * torch.exp((z - lse_rest[rows, None].to(acc)).clamp(max=0.0))
        dz.scatter_(1, ids[rows], fix[rows].to(acc))
        dz /= temperature
        if d_hidden is not None:
            d_hidden[rows] = dz @ w
        if d_weight is not None:
            d_weight += dz.T @ h
    return (
        None if d_hidden is None else d_hidden.to(hidden.dtype),
        None if d_weight is None else d_weight.to(weight.dtype),
    )


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("credit::linear_logits_backward", mutates_args=())
def _linear_logits_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    fix: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    lse_rest: Optional[torch.Tensor],
    coef_rest: Optional[torch.Tensor],
    temperature: float,
    backend: str,
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of linear_topk and linear_gather: (d_hidden [N, d] or [0], d_weight [V, d] or [0]).

    With z = hidden @ weight.T / T and p = softmax(z), the gradient w.r.t. the logits is
        dz[i, v] = coef[i] p[i, v] + coef_rest[i] exp(z[i, v] - lse_rest[i])   for v not in ids[i]
        dz[i, v] = fix[i, j]                                                   for v = ids[i, j]
    (all over T); ids [N, k] int64, fix [N, k] and the [N] rows fp32, rest terms optional.
    """
    empty_h, empty_w = hidden.new_empty((0,)), weight.new_empty((0,))
    if hidden.shape[0] == 0:
        return (torch.zeros_like(hidden) if needs_hidden_grad else empty_h,
                torch.zeros_like(weight) if needs_weight_grad else empty_w)
    args = (hidden, weight, ids, fix, lse, coef, lse_rest, coef_rest, temperature)
    if backend == "cpp":
        return torch.ops.credit_C.linear_logits_bwd(*args, needs_hidden_grad, needs_weight_grad, 0)
    fn = _linear_logits_bwd_torch if backend == "torch" else _linear_logits_bwd_triton
    dh, dw = fn(*args, needs_hidden_grad, needs_weight_grad)
    return (dh if dh is not None else empty_h, dw if dw is not None else empty_w)


@_linear_logits_backward_op.register_fake
def _(hidden, weight, ids, fix, lse, coef, lse_rest, coef_rest, temperature, backend, needs_hidden_grad,
      needs_weight_grad):
    return (hidden.new_empty(hidden.shape if needs_hidden_grad else (0,)),
            weight.new_empty(weight.shape if needs_weight_grad else (0,)))


def _empty_outputs(hidden: torch.Tensor, k: int):
    return (hidden.new_empty((0, k), dtype=torch.float32), hidden.new_empty((0,), dtype=torch.float32),
            hidden.new_empty((0, k), dtype=torch.long))


@torch.library.custom_op("credit::linear_topk", mutates_args=())
def _linear_topk_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    temperature: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [N, k] fp32 sorted descending, lse [N] fp32, ids [N, k] int64).

    ids come last: opcheck's autograd test sums the outputs in order into the first one's dtype.
    """
    if hidden.shape[0] == 0:
        return _empty_outputs(hidden, k)
    if backend == "cpp":
        ids, logp, lse = torch.ops.credit_C.linear_topk_fwd(hidden, weight, k, temperature, 0)
    elif backend == "torch":
        ids, logp, lse = linear_topk_ref(hidden, weight, k, temperature=temperature)
    else:
        ids, logp, lse = _linear_topk_fwd_triton(hidden, weight, k, temperature)
    return logp, lse, ids


@_linear_topk_op.register_fake
def _(hidden, weight, k, temperature, backend):
    torch._check(hidden.dim() == 2 and weight.dim() == 2)
    torch._check(hidden.shape[1] == weight.shape[1])
    torch._check(1 <= k)
    n = hidden.shape[0]
    return (hidden.new_empty((n, k), dtype=torch.float32), hidden.new_empty((n,), dtype=torch.float32),
            hidden.new_empty((n, k), dtype=torch.long))


def _setup_context(ctx, inputs, output):
    hidden, weight, _, temperature, backend = inputs  # _ = k
    logp, lse, ids = output
    ctx.save_for_backward(hidden, weight, ids, logp, lse)
    ctx.args = (temperature, backend)


def _backward(ctx, grad_logp, grad_lse, grad_ids):
    hidden, weight, ids, logp, lse = ctx.saved_tensors
    temperature, backend = ctx.args
    needs_dh, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (needs_dh or needs_dw):
        return None, None, None, None, None
    # dz = sum_j g_j onehot(id_j) + (g_lse - sum_j g_j) p; at the ids from the saved logp, in fp32
    g = grad_logp.float() if grad_logp is not None else torch.zeros_like(logp)
    coef = -g.sum(dim=1)
    if grad_lse is not None:
        coef = coef + grad_lse.float()
    fix = coef[:, None] * logp.exp() + g
    d_hidden, d_weight = _linear_logits_backward_op(
        hidden, weight, ids, fix, lse, coef, None, None, temperature, backend, needs_dh, needs_dw
    )
    return (
        d_hidden if needs_dh else None,
        d_weight if needs_dw else None,
        None,  # k
        None,  # temperature
        None,  # backend
    )


_linear_topk_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


class TopKOutput(NamedTuple):
    """linear_topk's result; shapes for hidden [..., d]."""

    ids: torch.Tensor  # [..., k] int64, by logit descending; equal logits: smaller id first
    logp: torch.Tensor  # [..., k] fp32 log-probs at ids (differentiable)
    lse: torch.Tensor  # [...] fp32 logsumexp of the tempered logits (differentiable)


def _has_cpp_ops() -> bool:
    # a _C built before csrc/linear_topk.cpp existed has no such ops
    return _ext.HAS_EXT and hasattr(torch.ops.credit_C, "linear_topk_fwd")


def _resolve(backend: str, device: torch.device, op: str, k: Optional[int] = None) -> str:
    resolved = resolve_backend(backend, device, op)
    if resolved == "cpp" and not _has_cpp_ops():
        if backend != "auto":
            raise ValueError(f"{op}: backend='cpp' but credit_kernels._C was built without csrc/linear_topk.cpp; "
                             "rebuild it (python setup.py build_ext --inplace)")
        resolved = "torch"
    if resolved == "triton" and k is not None and k > TRITON_MAX_K:
        if backend != "auto":
            raise ValueError(f"{op}: backend='triton' supports k <= {TRITON_MAX_K}; got k={k} (use backend='auto')")
        resolved = "torch"
    return resolved


def _validate_common(op, hidden, weight, temperature):
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: hidden and weight must be tensors; got {type(hidden).__name__} and "
                        f"{type(weight).__name__}")
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(
            f"{op}: hidden must be [..., d] and weight [V, d]; got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: hidden [..., d] and weight [V, d] must share d; got d={hidden.shape[-1]} and "
            f"weight {tuple(weight.shape)}"
        )
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{op}: {name} must be fp32, bf16 or fp16; got {t.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{op}: hidden and weight must share a dtype; got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"{op}: hidden and weight must be on one device; got {hidden.device} and {weight.device}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a finite number > 0; got {temperature!r}")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight has V = 0 rows; the vocabulary must not be empty")


def _check_finite(op, logp, lse, hidden, weight):
    # NaN/inf in hidden or weight make the affected rows' lse non-finite; checking the small outputs is
    # cheap, and only on failure do we scan the inputs to name the culprit.
    if bool(torch.isfinite(lse).all()) and not bool(torch.isnan(logp).any()):
        return
    for name, t in (("hidden", hidden), ("weight", weight)):
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            idx = tuple(bad.nonzero()[0].tolist())
            raise ValueError(f"{op}: {name} contains NaN/inf (first at {name}{list(idx)} = {t[idx].item()})")
    raise ValueError(f"{op}: logits overflowed to inf (hidden @ weight.T / temperature exceeds fp32 range)")


def linear_topk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
    check_inputs: bool = True,
) -> TopKOutput:
    """The k most likely tokens of softmax(hidden @ weight.T / temperature), without the N x V logits.

    Ties: equal logits are ranked by the smaller token id first, deterministically, on every backend
    (the kernels compare the fp32 logit, then the id; -0.0 and +0.0 are equal). Backends may order
    logits that differ by less than their rounding error differently.

    Args:
        hidden: [..., d] bf16/fp16/fp32, the final hidden states.
        weight: [V, d], same dtype (the LM head).
        k: number of tokens per row, 1 <= k <= V.
        temperature: logits are divided by it (> 0).
        backend: "auto" (CUDA -> "triton" for k <= TRITON_MAX_K, else "torch"; CPU -> "cpp" if the
            extension is built, else "torch"), "triton" (CPU tensors only under TRITON_INTERPRET=1),
            "cpp", "torch" (reference).
        check_inputs: raise ValueError for NaN/inf in hidden or weight (one device sync; skipped under
            torch.compile). With check_inputs=False the affected rows come out NaN or garbage.

    Returns:
        TopKOutput(ids [..., k] int64, logp [..., k] fp32 descending, lse [...] fp32). logp and lse are
        differentiable w.r.t. hidden and weight (exact gradients, fp32 accumulation); ids are not.
    """
    op = "linear_topk"
    _validate_common(op, hidden, weight, temperature)
    vocab = weight.shape[0]
    try:
        if isinstance(k, bool):
            raise TypeError
        k = operator.index(k)  # int, numpy / 0-d torch integers; not floats
    except TypeError:
        raise TypeError(f"{op}: k must be an int; got {type(k).__name__} {k!r}") from None
    if not 1 <= k <= vocab:
        raise ValueError(f"{op}: k must lie in [1, V={vocab}]; got k={k}")
    resolved = _resolve(backend, hidden.device, op, k)
    batch_shape = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    logp, lse, ids = _linear_topk_op(h, weight, int(k), float(temperature), resolved)
    if check_inputs and not torch.compiler.is_compiling() and h.shape[0]:
        _check_finite(op, logp, lse, hidden, weight)
    return TopKOutput(ids.reshape(*batch_shape, k), logp.reshape(*batch_shape, k), lse.reshape(batch_shape))
