"""Log-probs at given token ids plus the tail bucket, without the N x V logits.

    z = hidden @ weight.T / temperature          [N, V], never stored whole
    logp[i, j] = z[i, ids[i, j]] - lse[i]        fp32
    tail[i]    = log(1 - sum_{v in S_i} p[i, v]) = logsumexp_{v not in S_i} z[i, v] - lse[i]
                 with S_i the DISTINCT ids of row i

This is the teacher's side of SDPO's top-k (+ tail) logit-level loss (the method's "logit-level
variant"): the teacher's log-probs at the student's top-k ids (linear_topk.py) and the mass outside them.
The tail is a second online logsumexp over the non-gathered logits inside the kernel, never
log1p(-sum p): it stays finite and accurate when the gathered mass is ~1 (log1p(-sum p) cancels to -inf
or NaN there). When a row's ids cover the whole vocabulary its tail is -inf exactly, with zero gradient.
Duplicate ids in a row are gathered at each position (and receive the sum of their gradients) but count
once in the tail.

Gradients (p = softmax(z), q = exp(tail), p_rest[v] = [v not in S] p[v] / q = exp(z[v] - lse_rest), lse_rest
the logsumexp of the non-gathered logits):
    d logp[i, j] / dz = onehot(ids[i, j]) - p
    d tail[i] / dz    = p_rest - p

Backends (custom op `credit::linear_gather`, autograd through `credit::linear_logits_backward`:
credit_kernels/linear_logits_backward.py):
    triton  CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests).
    cpp     the compiled CPU kernel in csrc/linear_topk.cpp.
    torch   credit_kernels.reference.linear_gather_ref (chunked PyTorch), the oracle.
Inputs, autocast and precision follow the family's policy (credit_kernels/_core.py, docs/kernels.md).

Triton schedule (forward): the (row block, vocabulary split) grid of linear_logprob. The host sorts each
row's ids and gives each (row, split) its start in the sorted list; walking a tile, every program
advances each row's pointer over the ids that fall in the tile (on average k * BLOCK_V / V of them, so
the walk costs about one compare per tile), marking them, storing their logits, and leaving them out
of the second (tail) logsumexp.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from credit_kernels import _core
from credit_kernels import _triton_utils as tu
from credit_kernels._core import HAS_TRITON
from credit_kernels.linear_logits_backward import linear_logits_backward
from credit_kernels.reference import linear_gather_fwd_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    from credit_kernels._triton_utils import grouped_pid, logit_tile, online_lse_step

BACKENDS = ("auto", "triton", "cpp", "torch")

# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _linear_gather_fwd_kernel(
        hidden_ptr, weight_ptr, sorted_ids_ptr, start_ptr,
        part_max_ptr, part_sum_ptr, rest_max_ptr, rest_sum_ptr, gathered_ptr,
        N, V, D, K, inv_temp, tiles_per_split, num_splits,
        stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
        HAS_TAIL: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """Partials of one (row block, vocabulary split).

        hidden [N, D], weight [V, D] (bf16/fp16/fp32); sorted_ids [N, K] int64 (each row ascending);
        start [N, num_splits] int32, the first position in the row's sorted ids at or past the split.
        Writes, fp32, at [row, split]: part_max = m, part_sum = sum exp(z - m) over all v, and (if
        HAS_TAIL) rest_max / rest_sum, the same over the v not in the row's ids; and
        gathered[row, j] = z[row, sorted_ids[row, j]] for the positions j that fall in the split.
        """
        pid_n, pid_s = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, GROUP_N)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        v_lo = pid_s * tiles_per_split * BLOCK_V
        n_tiles = tl.minimum(tiles_per_split, tl.cdiv(V - v_lo, BLOCK_V))  # >= 1 by construction
        row_ids = sorted_ids_ptr + offs_n.to(tl.int64) * K  # int64: N * K can pass 2^31
        row_out = gathered_ptr + offs_n.to(tl.int64) * K
        part = offs_n.to(tl.int64) * num_splits + pid_s

        pos = tl.load(start_ptr + part, mask=mask_n, other=0)
        pos = tl.where(mask_n, pos, K)  # rows past N have nothing to walk
        nxt = tl.load(row_ids + pos, mask=pos < K, other=V)  # the row's next id (V: none left)
        m_i = tl.full((BLOCK_N,), -1.0e30, dtype=tl.float32)
        s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
        r_m = tl.full((BLOCK_N,), -1.0e30, dtype=tl.float32)
        r_s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for tile in range(0, n_tiles):
            offs_v = v_lo + tile * BLOCK_V + tl.arange(0, BLOCK_V)
            mask_v = offs_v < V
            tile_end = tl.minimum(v_lo + (tile + 1) * BLOCK_V, V)
            z = logit_tile(
                hidden_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, D,
                stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d,
                BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, INPUT_PRECISION,
            ) * inv_temp
            z = tl.where(mask_v[None, :], z, float("-inf"))
            # 1. walk the ids inside this tile: store their logits, mark them (duplicates mark one column)
            member = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.int32)
            hit = nxt < tile_end
            while tl.max(hit.to(tl.int32), axis=0) > 0:
                at = (offs_v[None, :] == nxt[:, None]) & hit[:, None]
                member = member | at.to(tl.int32)
                tl.store(row_out + pos, tl.sum(tl.where(at, z, 0.0), axis=1), mask=hit)
                pos += hit.to(tl.int32)
                nxt = tl.load(row_ids + pos, mask=pos < K, other=V)
                hit = nxt < tile_end
            # 2. online logsumexp over all v, as in linear_logprob
            m_i, s_i, _, _ = online_lse_step(m_i, s_i, z)
            # 3. and over the v not gathered (the tail); exp(-inf - finite) = 0 keeps an empty sum at 0
            if HAS_TAIL:
                r_m, r_s, _, _ = online_lse_step(r_m, r_s, tl.where(member > 0, float("-inf"), z))

        tl.store(part_max_ptr + part, m_i, mask=mask_n)
        tl.store(part_sum_ptr + part, s_i, mask=mask_n)
        if HAS_TAIL:
            tl.store(rest_max_ptr + part, r_m, mask=mask_n)
            tl.store(rest_sum_ptr + part, r_s, mask=mask_n)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def _linear_gather_fwd_triton(hidden, weight, ids, temperature, tail):
    """(logp [N, k], tail [N] or None, row_max [N], log_norm [N]), in shifted units (see _triton_utils)."""
    n, d = hidden.shape
    vocab, k = weight.shape[0], ids.shape[1]
    dev = hidden.device
    cfg = tu.logits_config(dev, n, "gather")
    n_blocks, tiles_per_split, num_splits = tu.split_plan(n, vocab, cfg, dev)
    sorted_ids, order = ids.sort(dim=1)
    bounds = torch.arange(num_splits, device=dev, dtype=torch.int64) * (tiles_per_split * cfg["BLOCK_V"])
    starts = torch.searchsorted(sorted_ids, bounds.expand(n, num_splits).contiguous(), out_int32=True)
    f32 = dict(dtype=torch.float32, device=dev)
    part_max = _core.scratch((n, num_splits), **f32)
    part_sum = _core.scratch((n, num_splits), **f32)
    rest_max = _core.scratch((n, num_splits), **f32) if tail else part_max
    rest_sum = _core.scratch((n, num_splits), **f32) if tail else part_sum
    gathered_sorted = _core.scratch((n, k), **f32)
    _linear_gather_fwd_kernel[(n_blocks * num_splits,)](
        hidden, weight, sorted_ids, starts, part_max, part_sum, rest_max, rest_sum, gathered_sorted,
        n, vocab, d, k, 1.0 / temperature, tiles_per_split, num_splits,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], GROUP_N=cfg["GROUP_N"],
        HAS_TAIL=tail, **tu.dot_flags(dev, hidden.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    row_max, log_norm = tu.combine_splits(part_max, part_sum)
    gathered = torch.empty_like(gathered_sorted).scatter_(1, order, gathered_sorted)
    logp = (gathered - row_max[:, None]) - log_norm[:, None]
    tail_out = None
    if tail:
        r_max, r_norm = tu.combine_splits(rest_max, rest_sum)
        tail_out = ((r_max - row_max) + r_norm) - log_norm
    return logp, tail_out, row_max, log_norm


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("credit::linear_gather", mutates_args=())
@_core.no_autocast
def _linear_gather_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    temperature: float,
    tail: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [N, k], tail [N] or [0] when tail=False, lse [N], row_max [N], log_norm [N]), fp32.

    row_max and log_norm (lse = row_max + log_norm) are for the backward, without gradient.
    """
    n = hidden.shape[0]
    empty = hidden.new_empty((0,), dtype=torch.float32)
    if n == 0:
        return hidden.new_empty(ids.shape, dtype=torch.float32), empty, empty.clone(), empty.clone(), empty.clone()
    if backend == "cpp":
        logp, tail_out, lse, row_max, log_norm = torch.ops.credit_C.linear_gather_fwd(hidden, weight, ids,
                                                                                       temperature, tail, 0)
    elif backend == "torch":
        logp, tail_out, lse, row_max, log_norm = linear_gather_fwd_ref(hidden, weight, ids, temperature=temperature,
                                                                       tail=tail)
    else:
        logp, tail_out, row_max, log_norm = _linear_gather_fwd_triton(hidden, weight, ids, temperature, tail)
        lse = row_max + log_norm
    return logp, tail_out if tail else empty, lse, row_max, log_norm


@_linear_gather_op.register_fake
def _(hidden, weight, ids, temperature, tail, backend):
    torch._check(hidden.dim() == 2 and weight.dim() == 2 and ids.dim() == 2)
    torch._check(hidden.shape[1] == weight.shape[1])
    torch._check(ids.shape[0] == hidden.shape[0])
    n = hidden.shape[0]
    f32 = torch.float32
    rows = [hidden.new_empty((n,), dtype=f32) for _ in range(3)]
    return (hidden.new_empty(ids.shape, dtype=f32), hidden.new_empty((n if tail else 0,), dtype=f32), *rows)


def _dedup_sum(ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[N, k]: at each position, the sum of g over the positions of the row holding the same id."""
    sorted_ids, order = ids.sort(dim=1)
    g_sorted = g.gather(1, order)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    segment = new.long().cumsum(dim=1) - 1  # run index of each sorted position
    totals = torch.zeros_like(g_sorted).scatter_add_(1, segment, g_sorted)
    return torch.empty_like(g).scatter_(1, order, totals.gather(1, segment))


def _setup_context(ctx, inputs, output):
    hidden, weight, ids, temperature, tail, backend = inputs
    logp, tail_out, _, row_max, log_norm = output
    ctx.mark_non_differentiable(row_max, log_norm)
    ctx.save_for_backward(hidden, weight, ids, logp, tail_out, row_max, log_norm)
    ctx.args = (temperature, tail, backend)


def _backward(ctx, grad_logp, grad_tail, grad_lse, grad_row_max, grad_log_norm):
    hidden, weight, ids, logp, tail_out, row_max, log_norm = ctx.saved_tensors
    temperature, tail, backend = ctx.args
    needs_dh, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (needs_dh or needs_dw):
        return None, None, None, None, None, None
    # dz = sum_j g_j onehot(id_j) - (sum_j g_j) p + g_lse p + g_tail (p_rest - p)
    g = grad_logp.float() if grad_logp is not None else torch.zeros_like(logp)
    coef = -g.sum(dim=1)
    if grad_lse is not None:
        coef = coef + grad_lse.float()
    rest_shift = coef_rest = None
    if tail and grad_tail is not None:
        finite = torch.isfinite(tail_out)
        # a tail of -inf (ids cover the vocabulary) gets zero gradient; rest_shift = +inf makes p_rest 0. Otherwise
        # rest_shift = lse_rest - row_max = tail + log_norm, both small: no rounding of a large lse_rest
        coef_rest = torch.where(finite, grad_tail.float(), torch.zeros_like(tail_out))
        rest_shift = torch.where(finite, tail_out + log_norm, torch.full_like(log_norm, float("inf")))
        coef = coef - coef_rest
    # at gathered ids p_rest = 0: the whole entry is coef p + (sum of g over the id's positions)
    fix = coef[:, None] * logp.exp() + _dedup_sum(ids, g)
    d_hidden, d_weight = linear_logits_backward(
        hidden, weight, ids, fix, row_max, log_norm, coef, rest_shift, coef_rest, temperature, backend, needs_dh,
        needs_dw,
    )
    return (
        d_hidden,
        d_weight,
        None,  # ids
        None,  # temperature
        None,  # tail
        None,  # backend
    )


_linear_gather_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


class GatherOutput(NamedTuple):
    """linear_gather's result; shapes for hidden [..., d] and ids [..., k]."""

    logp: torch.Tensor  # [..., k] fp32 log-probs at ids (differentiable)
    tail: Optional[torch.Tensor]  # [...] fp32 log(1 - mass of the distinct ids), or None (tail=False)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend for `device` and check that an explicit one can run there."""
    return _core.resolve_backend("linear_gather", backend, device, choices=BACKENDS, cpp_op="linear_gather_fwd")


def _check_ids(op, ids, hidden):
    _core.check_index_tensor(op, "ids", ids)
    if ids.dim() != hidden.dim() or ids.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"{op}: ids must have shape {tuple(hidden.shape[:-1])} + (k,) matching hidden; got {tuple(ids.shape)}"
        )
    if ids.shape[-1] < 1:
        raise ValueError(f"{op}: ids must hold k >= 1 ids per row; got shape {tuple(ids.shape)}")
    if ids.device != hidden.device:
        raise ValueError(f"{op}: ids must be on hidden's device {hidden.device}; got {ids.device}")


def linear_gather(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    tail: bool = True,
    backend: str = "auto",
    check_inputs: bool = True,
) -> GatherOutput:
    """log softmax(hidden @ weight.T / temperature) at `ids`, plus the tail bucket, without N x V logits.

    Args:
        hidden: [..., d] bf16/fp16/fp32, the final hidden states (any strides).
        weight: [V, d], same dtype (the LM head; any strides).
        ids: [..., k] integer (any layout), k >= 1 token ids per row in [0, V) (e.g. the student's top-k ids).
            Repeated ids within a row are gathered at every position and counted once in the tail.
        temperature: logits are divided by it (> 0).
        tail: also return log(1 - sum of p over the row's distinct ids), computed as logsumexp over the
            non-gathered logits minus the row's logsumexp: finite and accurate even when the gathered
            mass is ~1; exactly -inf (with zero gradient) when the ids cover the whole vocabulary.
        backend: "auto" (CUDA -> "triton", CPU -> "cpp" if the extension is built, else "torch"),
            "triton" (CPU tensors only under TRITON_INTERPRET=1), "cpp", "torch" (reference).
        check_inputs: validate the id range and finiteness (one device sync each; skipped under
            torch.compile). An out-of-range id or NaN/inf in hidden or weight raises ValueError.

    Under torch.autocast, hidden and weight are cast to the autocast dtype first (as F.linear does); outputs stay
    fp32 and gradients come back in each input's dtype (docs/kernels.md).

    Returns:
        GatherOutput(logp [..., k] fp32, tail [...] fp32 or None). Both are differentiable w.r.t.
        hidden and weight (exact gradients, fp32 accumulation).
    """
    op = "linear_gather"
    hidden, weight = _core.autocast_operands(hidden, weight)
    _core.check_linear(op, hidden, weight, temperature)
    vocab = weight.shape[0]
    _check_ids(op, ids, hidden)
    resolved = resolve_backend(backend, hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    flat_ids = _core.index_operand(ids.reshape(-1, ids.shape[-1]))
    checking = check_inputs and not torch.compiler.is_compiling() and h.shape[0] > 0
    if checking:
        _core.check_index_range(op, "ids", ids, vocab)
    logp, tail_out, lse, _, _ = _linear_gather_op(h, weight, flat_ids, float(temperature), bool(tail), resolved)
    if checking:
        _core.check_finite_outputs(
            op, torch.isfinite(lse).all() & ~torch.isnan(logp).any(), {"hidden": hidden, "weight": weight},
            overflow="logits overflowed to inf (hidden @ weight.T / temperature exceeds fp32 range)",
        )
    return GatherOutput(logp.reshape(ids.shape), tail_out.reshape(ids.shape[:-1]) if tail else None)
