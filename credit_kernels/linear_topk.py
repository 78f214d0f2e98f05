"""Top-k tokens of softmax(hidden @ weight.T / T) with their log-probs, without the N x V logits.

    z = hidden @ weight.T / temperature          [N, V], never stored whole
    ids[i]  = the k largest z[i, :], by value descending; equal values: the smaller token id first
    logp[i, j] = z[i, ids[i, j]] - lse[i]        fp32, lse[i] = logsumexp(z[i])

This is the student's top-k (+ tail) of SDPO's logit-level loss and of CREDIT's contrastive teacher at
logit level (the method's "logit-level variant"); `linear_gather` (linear_gather.py) scores the
teacher at the same ids. Gradients flow to hidden and weight through logp and lse (ids are integers):
    d logp[i, j] / dz = onehot(ids[i, j]) - p,   d lse[i] / dz = p.

Backends (custom op `credit::linear_topk`, autograd through `credit::linear_logits_backward`, shared
with `credit::linear_gather`: credit_kernels/linear_logits_backward.py):
    triton  CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests); k <= TRITON_MAX_K.
    cpp     the compiled CPU kernel in csrc/linear_topk.cpp (chunked, multi-threaded).
    torch   credit_kernels.reference.linear_topk_ref (chunked PyTorch), the oracle.
Inputs, autocast and precision follow the family's policy (credit_kernels/_core.py, docs/kernels.md).

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
dz (coef p, plus coef_rest p_rest for linear_gather's tail), the host writes the few entries
at the ids (computed in fp32 from the saved log-probs, so bf16 dz is rounded once), then two matmuls
give d hidden and d weight as in linear_logprob.
"""

from __future__ import annotations

import operator
from typing import NamedTuple, Optional

import torch

from credit_kernels import _core
from credit_kernels import _triton_utils as tu
from credit_kernels._core import HAS_TRITON
from credit_kernels.linear_logits_backward import linear_logits_backward
from credit_kernels.reference import linear_topk_fwd_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    from credit_kernels._triton_utils import grouped_pid, logit_tile, online_lse_step

BACKENDS = ("auto", "triton", "cpp", "torch")
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
        pid_n, pid_s = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, GROUP_N)
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
            z = logit_tile(
                hidden_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, D,
                stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d,
                BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, INPUT_PRECISION,
            ) * inv_temp
            z = tl.where(mask_v[None, :], z, float("-inf"))
            # 1. online logsumexp, as in linear_logprob
            z_max = tl.max(z, axis=1)
            m_i, s_i, _, _ = online_lse_step(m_i, s_i, z)
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


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys of _topk_keys -> (fp32 logits, int64 ids)."""
    k32 = (keys >> 32).to(torch.int32)
    bits = torch.where(k32 >= 0, k32, k32 ^ 0x7FFFFFFF)
    return bits.view(torch.float32), 4294967295 - (keys & 4294967295)


def _linear_topk_fwd_triton(hidden, weight, k, temperature):
    """(ids [N, k], logp [N, k], row_max [N], log_norm [N])."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    cfg = tu.logits_config(dev, n, "topk")
    n_blocks, tiles_per_split, num_splits = tu.split_plan(n, vocab, cfg, dev)
    f32 = dict(dtype=torch.float32, device=dev)
    part_max = _core.scratch((n, num_splits), **f32)
    part_sum = _core.scratch((n, num_splits), **f32)
    # int64 has no NaN: the poisoned scratch holds the largest key, which would win the final topk and decode to NaN
    part_key = _core.scratch((n, num_splits, k), dtype=torch.int64, device=dev)
    _linear_topk_fwd_kernel[(n_blocks * num_splits,)](
        hidden, weight, part_max, part_sum, part_key,
        n, vocab, d, k, 1.0 / temperature, tiles_per_split, num_splits,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], GROUP_N=cfg["GROUP_N"],
        K_PAD=max(16, triton.next_power_of_2(k)), **tu.dot_flags(dev, hidden.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    row_max, log_norm = tu.combine_splits(part_max, part_sum)
    # keys are unique, so this merge is deterministic; sorted=True gives the ranking order
    top = part_key.view(n, num_splits * k).topk(k, dim=1).values
    values, ids = _decode_keys(top)
    return ids, (values - row_max[:, None]) - log_norm[:, None], row_max, log_norm


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------


def _empty_outputs(hidden: torch.Tensor, k: int):
    rows = [hidden.new_empty((0,), dtype=torch.float32) for _ in range(3)]
    return hidden.new_empty((0, k), dtype=torch.float32), *rows, hidden.new_empty((0, k), dtype=torch.long)


@torch.library.custom_op("credit::linear_topk", mutates_args=())
@_core.no_autocast
def _linear_topk_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    temperature: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [N, k] fp32 sorted descending, lse [N], row_max [N], log_norm [N] fp32, ids [N, k] int64).

    row_max and log_norm (lse = row_max + log_norm) are for the backward, without gradient. ids come last:
    opcheck's autograd test sums the outputs in order into the first one's dtype.
    """
    if hidden.shape[0] == 0:
        return _empty_outputs(hidden, k)
    if backend == "cpp":
        ids, logp, lse, row_max, log_norm = torch.ops.credit_C.linear_topk_fwd(hidden, weight, k, temperature, 0)
    elif backend == "torch":
        ids, logp, lse, row_max, log_norm = linear_topk_fwd_ref(hidden, weight, k, temperature=temperature)
    else:
        ids, logp, row_max, log_norm = _linear_topk_fwd_triton(hidden, weight, k, temperature)
        lse = row_max + log_norm
    return logp, lse, row_max, log_norm, ids


@_linear_topk_op.register_fake
def _(hidden, weight, k, temperature, backend):
    torch._check(hidden.dim() == 2 and weight.dim() == 2)
    torch._check(hidden.shape[1] == weight.shape[1])
    torch._check(1 <= k)
    n = hidden.shape[0]
    rows = [hidden.new_empty((n,), dtype=torch.float32) for _ in range(3)]
    return (hidden.new_empty((n, k), dtype=torch.float32), *rows, hidden.new_empty((n, k), dtype=torch.long))


def _setup_context(ctx, inputs, output):
    hidden, weight, _, temperature, backend = inputs  # _ = k
    logp, _, row_max, log_norm, ids = output
    ctx.mark_non_differentiable(row_max, log_norm, ids)
    ctx.save_for_backward(hidden, weight, ids, logp, row_max, log_norm)
    ctx.args = (temperature, backend)


def _backward(ctx, grad_logp, grad_lse, grad_row_max, grad_log_norm, grad_ids):
    hidden, weight, ids, logp, row_max, log_norm = ctx.saved_tensors
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
    d_hidden, d_weight = linear_logits_backward(
        hidden, weight, ids, fix, row_max, log_norm, coef, None, None, temperature, backend, needs_dh, needs_dw
    )
    return (
        d_hidden,
        d_weight,
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


def resolve_backend(backend: str, device: torch.device, k: Optional[int] = None) -> str:
    """Map "auto" to a concrete backend for `device` (and k) and check that an explicit one can run there."""
    too_big = f"supports k <= {TRITON_MAX_K}; got k={k}" if k is not None and k > TRITON_MAX_K else None
    return _core.resolve_backend("linear_topk", backend, device, choices=BACKENDS, cpp_op="linear_topk_fwd",
                                 triton_unsupported=too_big)


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
        hidden: [..., d] bf16/fp16/fp32, the final hidden states (any strides).
        weight: [V, d], same dtype (the LM head; any strides).
        k: number of tokens per row, 1 <= k <= V.
        temperature: logits are divided by it (> 0).
        backend: "auto" (CUDA -> "triton" for k <= TRITON_MAX_K, else "torch"; CPU -> "cpp" if the
            extension is built, else "torch"), "triton" (CPU tensors only under TRITON_INTERPRET=1),
            "cpp", "torch" (reference).
        check_inputs: raise ValueError for NaN/inf in hidden or weight (one device sync; skipped under
            torch.compile). With check_inputs=False the affected rows come out NaN or garbage.

    Under torch.autocast, hidden and weight are cast to the autocast dtype first (as F.linear does); outputs stay
    fp32 and gradients come back in each input's dtype (docs/kernels.md).

    Returns:
        TopKOutput(ids [..., k] int64, logp [..., k] fp32 descending, lse [...] fp32). logp and lse are
        differentiable w.r.t. hidden and weight (exact gradients, fp32 accumulation); ids are not.
    """
    op = "linear_topk"
    hidden, weight = _core.autocast_operands(hidden, weight)
    _core.check_linear(op, hidden, weight, temperature)
    vocab = weight.shape[0]
    try:
        if isinstance(k, bool):
            raise TypeError
        k = operator.index(k)  # int, numpy / 0-d torch integers; not floats
    except TypeError:
        raise TypeError(f"{op}: k must be an int; got {type(k).__name__} {k!r}") from None
    if not 1 <= k <= vocab:
        raise ValueError(f"{op}: k must lie in [1, V={vocab}]; got k={k}")
    resolved = resolve_backend(backend, hidden.device, k)
    batch_shape = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    logp, lse, _, _, ids = _linear_topk_op(h, weight, int(k), float(temperature), resolved)
    if check_inputs and not torch.compiler.is_compiling() and h.shape[0]:
        _core.check_finite_outputs(
            op, torch.isfinite(lse).all() & ~torch.isnan(logp).any(), {"hidden": hidden, "weight": weight},
            overflow="logits overflowed to inf (hidden @ weight.T / temperature exceeds fp32 range)",
        )
    return TopKOutput(ids.reshape(*batch_shape, k), logp.reshape(*batch_shape, k), lse.reshape(batch_shape))
