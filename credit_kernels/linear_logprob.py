"""Gathered log-softmax from hidden states: log p(target) without the N x V logits.

    z = hidden @ weight.T / temperature          [N, V], never stored whole
    logp[i] = z[i, y_i] - logsumexp(z[i])        fp32
    entropy[i] = -sum_v p_iv log p_iv            fp32, optional

This is the teacher's and the student's per-token log-prob in CREDIT (the method's s, a and b).

Backends (one custom op `credit::linear_logprob`, autograd through `credit::linear_logprob_backward`):
    triton  CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests).
    cpp     the compiled CPU kernel in csrc/linear_logprob.cpp (chunked, multi-threaded).
    torch   credit_kernels.reference (chunked PyTorch), the oracle.
Inputs, autocast and precision follow the family's policy (credit_kernels/_core.py, docs/kernels.md).

Triton schedule. Forward: a 2-D grid over (row block, vocabulary split). Each program computes
[BLOCK_N, BLOCK_V] logit tiles with tl.dot over d, sweeping the tiles of its split with an online
logsumexp, and writes per-(row, split) partials (max, sum exp, sum exp * shifted logit) plus the
target logit; a tiny combine over splits finishes. Row blocks are grouped (GROUP_N) so that programs
running together read the same weight tiles from L2: with many rows each W tile serves many rows,
which is what makes the op compute-bound. Backward: per row chunk, one kernel recomputes the logit
tiles and writes dz = d loss / d logits (bf16/fp16 as the inputs, fp32 for fp32); two matmuls give
d hidden = dz W and d weight += dz^T h (fp32 accumulation). Extra memory: chunk x V for dz. The forward
saves each row's max and the log-sum-exp of its shifted logits apart (credit_kernels/_triton_utils.py), so
the backward's p is as accurate at |z| ~ 1e4 as the materialised path's.
"""

from __future__ import annotations

from typing import Optional

import torch

from credit_kernels import _core
from credit_kernels import _triton_utils as tu
from credit_kernels._core import HAS_TRITON, INTERPRET  # noqa: F401  (credit.env reports them from here)
from credit_kernels.reference import linear_logprob_bwd_ref, linear_logprob_fwd_ref

BACKENDS = ("auto", "triton", "cpp", "torch")
# The forward kernel's config; bench/sweep_logprob.py swaps it to time others.
_config = tu.config

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from credit_kernels._triton_utils import grouped_pid, logit_tile, online_lse_step

    @triton.jit
    def _linear_logprob_fwd_kernel(
        hidden_ptr, weight_ptr, targets_ptr,
        part_max_ptr, part_sum_ptr, part_ent_ptr, target_logit_ptr,
        N, V, D, inv_temp, tiles_per_split, num_splits,
        stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
        HAS_ENTROPY: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """Partials of one (row block, vocabulary split).

        hidden [N, D], weight [V, D] (bf16/fp16/fp32, any strides), targets [N] int64 contiguous.
        Writes, fp32, at [row, split]: part_max = m, part_sum = sum exp(z - m),
        part_ent = sum exp(z - m) * (z - m) (if HAS_ENTROPY); and target_logit[row] = z[row, y]
        from the one split that holds y.
        """
        pid_n, pid_s = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, GROUP_N)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1)
        v_lo = pid_s * tiles_per_split * BLOCK_V
        n_tiles = tl.minimum(tiles_per_split, tl.cdiv(V - v_lo, BLOCK_V))  # >= 1 by construction

        # 1. online logsumexp over the split's tiles; a finite -1e30 start keeps 0 * (m_old - m_new) finite.
        m_i = tl.full((BLOCK_N,), -1.0e30, dtype=tl.float32)
        s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
        e_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
        t_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for tile in range(0, n_tiles):
            offs_v = v_lo + tile * BLOCK_V + tl.arange(0, BLOCK_V)
            mask_v = offs_v < V
            z = logit_tile(
                hidden_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, D,
                stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d,
                BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, INPUT_PRECISION,
            ) * inv_temp
            z = tl.where(mask_v[None, :], z, float("-inf"))
            # 2. the target logit, if this tile holds it
            t_i += tl.sum(tl.where(offs_v[None, :] == targets[:, None], z, 0.0), axis=1)
            # 3. rescale the running sums to the new max
            m_new, s_new, alpha, p = online_lse_step(m_i, s_i, z)
            if HAS_ENTROPY:
                # sum p (z - m_new) = alpha * (sum p_old (z - m_old) + (m_old - m_new) * sum p_old) + new tile
                zp = p * tl.where(mask_v[None, :], z - m_new[:, None], 0.0)
                e_i = alpha * (e_i + (m_i - m_new) * s_i) + tl.sum(zp, axis=1)
            s_i = s_new
            m_i = m_new

        part = offs_n.to(tl.int64) * num_splits + pid_s
        tl.store(part_max_ptr + part, m_i, mask=mask_n)
        tl.store(part_sum_ptr + part, s_i, mask=mask_n)
        if HAS_ENTROPY:
            tl.store(part_ent_ptr + part, e_i, mask=mask_n)
        owns_target = (targets >= v_lo) & (targets < v_lo + n_tiles * BLOCK_V)
        tl.store(target_logit_ptr + offs_n, t_i, mask=mask_n & owns_target)

    @triton.jit
    def _linear_logprob_bwd_kernel(
        hidden_ptr, weight_ptr, targets_ptr, row_max_ptr, log_norm_ptr, entropy_ptr,
        grad_logp_ptr, grad_entropy_ptr, grad_lse_ptr, dz_ptr,
        N, V, D, inv_temp, ignore_index,
        stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d, stride_dz_n,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
        HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
        UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """dz = d loss / d (hidden @ weight.T) for one [BLOCK_N, BLOCK_V] tile, stored in dz's dtype.

        Rows whose target is ignore_index get dz = 0 (their saved statistics are 0). With the forward's row max m
        and log_norm = log sum exp(z - m), log p = (z - m) - log_norm and p = exp(log p) (never exp(z - lse): see
        credit_kernels/_triton_utils.py):
            dz = (g_lse - g_logp) p + g_logp onehot(y) - g_ent p (log p + H), times 1/T.
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
        row_max = tl.load(row_max_ptr + offs_n, mask=mask_n, other=0.0)
        log_norm = tl.load(log_norm_ptr + offs_n, mask=mask_n, other=0.0)
        log_p = (z - row_max[:, None]) - log_norm[:, None]
        p = tl.exp(log_p)
        targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=ignore_index)
        keep = targets != ignore_index
        coef = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if HAS_GRAD_LSE:
            coef += tl.load(grad_lse_ptr + offs_n, mask=mask_n, other=0.0)
        dz = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        if HAS_GRAD_LOGP:
            g_logp = tl.load(grad_logp_ptr + offs_n, mask=mask_n, other=0.0)
            coef -= g_logp
            dz = tl.where(offs_v[None, :] == targets[:, None], g_logp[:, None], dz)
        dz += coef[:, None] * p
        if HAS_GRAD_ENTROPY:
            g_ent = tl.load(grad_entropy_ptr + offs_n, mask=mask_n, other=0.0)
            ent = tl.load(entropy_ptr + offs_n, mask=mask_n, other=0.0)
            dz -= g_ent[:, None] * p * (log_p + ent[:, None])
        dz = tl.where(keep[:, None], dz * inv_temp, 0.0)
        dz_ptrs = dz_ptr + offs_n.to(tl.int64)[:, None] * stride_dz_n + offs_v[None, :]
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _linear_logprob_fwd_triton(hidden, weight, targets, temperature, return_entropy):
    """(logp, entropy or None, row_max, log_norm), each [N] fp32, before the ignore mask."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    cfg = _config(dev)
    n_blocks, tiles_per_split, num_splits = tu.split_plan(n, vocab, cfg, dev)
    f32 = dict(dtype=torch.float32, device=dev)
    part_max = _core.scratch((n, num_splits), **f32)
    part_sum = _core.scratch((n, num_splits), **f32)
    part_ent = _core.scratch((n, num_splits), **f32) if return_entropy else part_sum
    target_logit = torch.zeros((n,), **f32)
    _linear_logprob_fwd_kernel[(n_blocks * num_splits,)](
        hidden, weight, targets, part_max, part_sum, part_ent, target_logit,
        n, vocab, d, 1.0 / temperature, tiles_per_split, num_splits,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], GROUP_N=cfg["GROUP_N"],
        HAS_ENTROPY=return_entropy, **tu.dot_flags(dev, hidden.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    # combine the splits: [N, S] -> [N], all in shifted units so |logits| ~ 1e4 keeps precision
    row_max, log_norm = tu.combine_splits(part_max, part_sum)
    logp = (target_logit - row_max) - log_norm
    entropy = None
    if return_entropy:
        scale = torch.exp(part_max - row_max[:, None])
        total = (part_sum * scale).sum(dim=1)
        shifted_mean = (scale * (part_ent + (part_max - row_max[:, None]) * part_sum)).sum(dim=1) / total
        entropy = log_norm - shifted_mean
    return logp, entropy, row_max, log_norm


def _linear_logprob_bwd_triton(
    grad_logp, grad_entropy, grad_lse, hidden, weight, targets, row_max, log_norm, entropy, temperature,
    ignore_index, needs_dh, needs_dw,
):
    d = hidden.shape[1]
    vocab = weight.shape[0]
    dev = hidden.device
    cfg = tu.config(dev, "dz")
    dummy = row_max  # stands in for absent row gradients (never read: the HAS_* flag is off)

    def write_dz(sl, h, dz):
        rows = h.shape[0]
        grid = (triton.cdiv(rows, cfg["BLOCK_N"]) * triton.cdiv(vocab, cfg["BLOCK_V"]),)
        _linear_logprob_bwd_kernel[grid](
            h, weight, targets[sl], row_max[sl], log_norm[sl], entropy[sl] if grad_entropy is not None else dummy,
            grad_logp[sl] if grad_logp is not None else dummy,
            grad_entropy[sl] if grad_entropy is not None else dummy,
            grad_lse[sl] if grad_lse is not None else dummy,
            dz, rows, vocab, d, 1.0 / temperature, ignore_index,
            h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
            BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], GROUP_N=cfg["GROUP_N"],
            HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
            HAS_GRAD_LSE=grad_lse is not None, **tu.dot_flags(dev, hidden.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    return tu.chunked_linear_backward(hidden, weight, needs_dh, needs_dw, write_dz)


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("credit::linear_logprob", mutates_args=())
@_core.no_autocast
def _linear_logprob_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [N], entropy [N] or [0], lse [N], row_max [N], log_norm [N]), fp32; ignored rows are 0 in all.

    lse = row_max + log_norm is the output; row_max and log_norm (the row max and the log-sum-exp of the shifted
    logits) are what the backward uses, without gradient.
    """
    n = hidden.shape[0]
    if n == 0:
        e = _empty(hidden)
        return e, e.clone(), e.clone(), e.clone(), e.clone()
    if backend == "cpp":
        logp, entropy, lse, row_max, log_norm = torch.ops.credit_C.linear_logprob_fwd(
            hidden, weight, targets, temperature, ignore_index, return_entropy, 0
        )
        return logp, entropy if return_entropy else _empty(hidden), lse, row_max, log_norm
    if backend == "torch":
        logp, entropy, lse, row_max, log_norm = linear_logprob_fwd_ref(
            hidden, weight, targets, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy,
        )
        return logp, entropy if return_entropy else _empty(hidden), lse, row_max, log_norm
    # triton
    keep = targets != ignore_index
    logp, entropy, row_max, log_norm = _linear_logprob_fwd_triton(hidden, weight, targets, temperature,
                                                                  return_entropy)
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
    row_max = torch.where(keep, row_max, zero)
    log_norm = torch.where(keep, log_norm, zero)
    logp = torch.where(keep, logp, zero)
    entropy = torch.where(keep, entropy, zero) if return_entropy else _empty(hidden)
    return logp, entropy, row_max + log_norm, row_max, log_norm


@_linear_logprob_op.register_fake
def _(hidden, weight, targets, temperature, ignore_index, return_entropy, backend):
    torch._check(hidden.dim() == 2 and weight.dim() == 2 and targets.dim() == 1)
    torch._check(hidden.shape[1] == weight.shape[1])
    torch._check(targets.shape[0] == hidden.shape[0])
    n = hidden.shape[0]
    out = hidden.new_empty((n,), dtype=torch.float32)
    ent = hidden.new_empty((n if return_entropy else 0,), dtype=torch.float32)
    return out, ent, out.new_empty((n,)), out.new_empty((n,)), out.new_empty((n,))


@torch.library.custom_op("credit::linear_logprob_backward", mutates_args=())
@_core.no_autocast
def _linear_logprob_backward_op(
    grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    grad_lse: Optional[torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    log_norm: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_hidden [N, d] or [0], d_weight [V, d] or [0]) in the inputs' dtypes."""
    empty_h, empty_w = hidden.new_empty((0,)), weight.new_empty((0,))
    if hidden.shape[0] == 0:
        return (torch.zeros_like(hidden) if needs_hidden_grad else empty_h,
                torch.zeros_like(weight) if needs_weight_grad else empty_w)
    if backend == "cpp":
        return torch.ops.credit_C.linear_logprob_bwd(
            grad_logp, grad_entropy, grad_lse, hidden, weight, targets, row_max, log_norm, entropy, temperature,
            ignore_index, needs_hidden_grad, needs_weight_grad, 0,
        )
    if backend == "torch":
        dh, dw = linear_logprob_bwd_ref(
            grad_logp, grad_entropy, grad_lse, hidden, weight, targets, row_max, log_norm,
            entropy if grad_entropy is not None else None,
            temperature=temperature, ignore_index=ignore_index,
            needs_hidden_grad=needs_hidden_grad, needs_weight_grad=needs_weight_grad,
        )
    else:
        def rows(g):  # fp32, contiguous
            return None if g is None else g.float().contiguous()

        dh, dw = _linear_logprob_bwd_triton(
            rows(grad_logp), rows(grad_entropy), rows(grad_lse), hidden, weight, targets, row_max.contiguous(),
            log_norm.contiguous(), entropy.contiguous(), temperature, ignore_index, needs_hidden_grad,
            needs_weight_grad,
        )
    return (dh if dh is not None else empty_h, dw if dw is not None else empty_w)


@_linear_logprob_backward_op.register_fake
def _(grad_logp, grad_entropy, grad_lse, hidden, weight, targets, row_max, log_norm, entropy, temperature,
      ignore_index, backend, needs_hidden_grad, needs_weight_grad):
    return (hidden.new_empty(hidden.shape if needs_hidden_grad else (0,)),
            weight.new_empty(weight.shape if needs_weight_grad else (0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, temperature, ignore_index, return_entropy, backend = inputs
    _, entropy, _, row_max, log_norm = output
    ctx.mark_non_differentiable(row_max, log_norm)
    ctx.save_for_backward(hidden, weight, targets, row_max, log_norm, entropy)
    ctx.args = (temperature, ignore_index, backend)


def _backward(ctx, grad_logp, grad_entropy, grad_lse, grad_row_max, grad_log_norm):
    hidden, weight, targets, row_max, log_norm, entropy = ctx.saved_tensors
    temperature, ignore_index, backend = ctx.args
    needs_dh, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (needs_dh or needs_dw):
        return None, None, None, None, None, None, None
    if grad_entropy is not None and grad_entropy.numel() == 0:
        grad_entropy = None  # entropy was not requested
    d_hidden, d_weight = _linear_logprob_backward_op(
        grad_logp, grad_entropy, grad_lse, hidden, weight, targets, row_max, log_norm, entropy,
        temperature, ignore_index, backend, needs_dh, needs_dw,
    )
    return (
        d_hidden if needs_dh else None,
        d_weight if needs_dw else None,
        None,  # targets
        None,  # temperature
        None,  # ignore_index
        None,  # return_entropy
        None,  # backend
    )


_linear_logprob_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend for `device` and check that an explicit one can run there."""
    return _core.resolve_backend("linear_logprob", backend, device, choices=BACKENDS, cpp_op="linear_logprob_fwd")


def _validate(hidden, weight, targets, temperature):
    op = "linear_logprob"
    _core.check_index_tensor(op, "targets", targets)
    _core.check_linear(op, hidden, weight, temperature)
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{op}: targets must have shape {tuple(hidden.shape[:-1])} matching hidden; got {tuple(targets.shape)}"
        )
    if targets.device != hidden.device:
        raise ValueError(
            f"{op}: hidden, weight and targets must be on one device; got {hidden.device}, {weight.device}, "
            f"{targets.device}"
        )


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
    check_inputs: bool = True,
):
    """log softmax(hidden @ weight.T / temperature) at `targets`, without the N x V logits.

    Args:
        hidden: [..., d] bf16/fp16/fp32, the final hidden states (any strides).
        weight: [V, d], same dtype (the LM head; any strides).
        targets: [...] integer, the token whose log-prob is wanted per row; rows equal to
            `ignore_index` give logp 0, entropy 0, lse 0 and zero gradient.
        temperature: logits are divided by it (> 0).
        return_entropy: also return the fp32 entropy of the full distribution per row.
        return_lse: also return the fp32 logsumexp of the (tempered) logits per row.
        backend: "auto" (CUDA -> "triton", CPU -> "cpp" if the extension is built, else "torch"),
            "triton" (CPU tensors only under TRITON_INTERPRET=1), "cpp", "torch" (reference).
        check_inputs: validate target range and finiteness (one device sync each; skipped
            automatically under torch.compile). NaN/inf in hidden or weight raise ValueError;
            with check_inputs=False the affected rows come out NaN.

    Under torch.autocast, hidden and weight are cast to the autocast dtype first (as F.linear does) and the
    softmax runs in fp32; outputs stay fp32 and gradients come back in each input's dtype (docs/kernels.md).

    Returns:
        logp [...] fp32; with return_entropy and/or return_lse a tuple (logp, entropy, lse)
        holding only the requested extras, in that order. All are differentiable w.r.t.
        hidden and weight (exact gradients, fp32 accumulation).
    """
    hidden, weight = _core.autocast_operands(hidden, weight)
    _validate(hidden, weight, targets, temperature)
    resolved = resolve_backend(backend, hidden.device)
    batch_shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = _core.index_operand(targets.reshape(-1))
    checking = check_inputs and not torch.compiler.is_compiling()
    if checking and t.numel():
        _core.check_index_range("linear_logprob", "targets", t, weight.shape[0], ignore_index=ignore_index)
    logp, entropy, lse, _, _ = _linear_logprob_op(
        h, weight, t, float(temperature), int(ignore_index), bool(return_entropy), resolved
    )
    if checking and t.numel():
        _core.check_finite_outputs(
            "linear_logprob", torch.isfinite(lse).all() & ~torch.isnan(logp).any(),
            {"hidden": hidden, "weight": weight},
            overflow="logits overflowed to inf (hidden @ weight.T / temperature exceeds fp32 range)",
        )
    outs = [logp.reshape(batch_shape)]
    if return_entropy:
        outs.append(entropy.reshape(batch_shape))
    if return_lse:
        outs.append(lse.reshape(batch_shape))
    return outs[0] if len(outs) == 1 else tuple(outs)
