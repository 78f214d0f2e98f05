"""Gathered log-softmax from hidden states: log p(target) without the N x V logits.

    z = hidden @ weight.T / temperature          [N, V], never stored whole
    logp[i] = z[i, y_i] - logsumexp(z[i])        fp32
    entropy[i] = -sum_v p_iv log p_iv            fp32, optional

This is the teacher's and the student's per-token log-prob in CREDIT (../shared/CREDIT.md: s, a, b).

Backends (one custom op `credit::linear_logprob`, autograd through `credit::linear_logprob_backward`):
    triton  CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests).
    cpp     the compiled CPU kernel in csrc/linear_logprob.cpp (chunked, multi-threaded).
    torch   credit_kernels.reference (chunked PyTorch), the oracle.

Triton schedule. Forward: a 2-D grid over (row block, vocabulary split). Each program computes
[BLOCK_N, BLOCK_V] logit tiles with tl.dot over d, sweeping the tiles of its split with an online
logsumexp, and writes per-(row, split) partials (max, sum exp, sum exp * shifted logit) plus the
target logit; a tiny combine over splits finishes. Row blocks are grouped (GROUP_N) so that programs
running together read the same weight tiles from L2: with many rows each W tile serves many rows,
which is what makes the op compute-bound. Backward: per row chunk, one kernel recomputes the logit
tiles and writes dz = d loss / d logits (bf16/fp16 as the inputs, fp32 for fp32); two matmuls give
d hidden = dz W and d weight += dz^T h (fp32 accumulation). Extra memory: chunk x V for dz.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from credit_kernels import _ext
from credit_kernels.reference import linear_logprob_bwd_ref, linear_logprob_ref

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs work without Triton
    HAS_TRITON = False

# Decided at import because @triton.jit reads it at decoration time.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ("auto", "triton", "cpp", "torch")
# Tests set this to fill scratch and output buffers with NaN, so an element a kernel forgets to write shows.
POISON = os.environ.get("CREDIT_POISON") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _grouped_pid(pid, num_n_blocks, num_cols, GROUP_N: tl.constexpr):
        # GROUP_N consecutive row blocks visit the same column (vocabulary split / tile) one after the
        # other, so the weight tiles they share stay in L2.
        pids_per_group = GROUP_N * num_cols
        group = pid // pids_per_group
        first_n = group * GROUP_N
        group_size = tl.minimum(num_n_blocks - first_n, GROUP_N)
        pid_n = first_n + (pid % pids_per_group) % group_size
        pid_col = (pid % pids_per_group) // group_size
        return pid_n, pid_col

    @triton.jit
    def _logit_tile(
        hidden_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, D,
        stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """[BLOCK_N, BLOCK_V] fp32 tile of hidden @ weight.T (int64 offsets: V * d can pass 2^31)."""
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        h_rows = hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hidden_n
        w_rows = weight_ptr + offs_v.to(tl.int64)[:, None] * stride_weight_v
        for k in range(0, D, BLOCK_D):
            offs_d = k + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            h = tl.load(h_rows + offs_d[None, :] * stride_hidden_d, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            w = tl.load(w_rows + offs_d[None, :] * stride_weight_d, mask=mask_v[:, None] & mask_d[None, :], other=0.0)
            if UPCAST_DOT:  # the interpreter's bf16 tl.dot is wrong; upcast there only
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        return acc

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

        hidden [N, D], weight [V, D] (bf16/fp16/fp32), targets [N] int64.
        Writes, fp32, at [row, split]: part_max = m, part_sum = sum exp(z - m),
        part_ent = sum exp(z - m) * (z - m) (if HAS_ENTROPY); and target_logit[row] = z[row, y]
        from the one split that holds y.
        """
        pid_n, pid_s = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, GROUP_N)
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
            z = _logit_tile(
                hidden_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, D,
                stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d,
                BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, INPUT_PRECISION,
            ) * inv_temp
            z = tl.where(mask_v[None, :], z, float("-inf"))
            # 2. the target logit, if this tile holds it
            t_i += tl.sum(tl.where(offs_v[None, :] == targets[:, None], z, 0.0), axis=1)
            # 3. rescale the running sums to the new max
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(z - m_new[:, None])
            if HAS_ENTROPY:
                # sum p (z - m_new) = alpha * (sum p_old (z - m_old) + (m_old - m_new) * sum p_old) + new tile
                zp = p * tl.where(mask_v[None, :], z - m_new[:, None], 0.0)
                e_i = alpha * (e_i + (m_i - m_new) * s_i) + tl.sum(zp, axis=1)
            s_i = s_i * alpha + tl.sum(p, axis=1)
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
        hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr,
        grad_logp_ptr, grad_entropy_ptr, grad_lse_ptr, dz_ptr,
        N, V, D, inv_temp, ignore_index,
        stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d, stride_dz_n,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
        HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
        UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """dz = d loss / d (hidden @ weight.T) for one [BLOCK_N, BLOCK_V] tile, stored in dz's dtype.

        Rows whose target is ignore_index get dz = 0 (their saved lse is 0). With p = exp(z - lse):
            dz = (g_lse - g_logp) p + g_logp onehot(y) - g_ent p (z - lse + H), times 1/T.
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
        shifted = z - lse[:, None]
        p = tl.exp(shifted)
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
            dz -= g_ent[:, None] * p * (shifted + ent[:, None])
        dz = tl.where(keep[:, None], dz * inv_temp, 0.0)
        dz_ptrs = dz_ptr + offs_n.to(tl.int64)[:, None] * stride_dz_n + offs_v[None, :]
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _scratch(shape, *, dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _config(device: torch.device, dtype: torch.dtype, kernel: str = "fwd") -> dict:
    """One fixed config per regime and kernel ("fwd"; "dz", the backward's logit-gradient kernel).

    GPU forward: the best of bench/sweep_logprob.py on an H200 (bf16, N = 16384, d in {1536, 3584}, V = 151936:
    1.22-1.31x cuBLAS's matmul against 1.48-1.53x for 128 x 128 tiles; bench/results/sweep_logprob_NVIDIA_H200.json).
    The dz kernel keeps the 128 x 128 Hopper starting point, not yet swept on a card.
    """
    if device.type != "cuda":  # interpreter: few, large programs (it costs ~ms per loop iteration)
        return dict(BLOCK_N=64, BLOCK_V=1024, BLOCK_D=64, GROUP_N=4, num_warps=4, num_stages=1)
    if kernel == "fwd":
        return dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64, GROUP_N=8, num_warps=8, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, GROUP_N=8, num_warps=8, num_stages=3)


def _dot_flags(device: torch.device, dtype: torch.dtype) -> dict:
    return dict(
        UPCAST_DOT=device.type != "cuda",
        # fp32 inputs get full-precision products, not tf32 (this is the accuracy reference dtype)
        INPUT_PRECISION="ieee" if dtype == torch.float32 or device.type != "cuda" else "tf32",
    )


def _num_splits(n_blocks: int, v_tiles: int, device: torch.device) -> int:
    if device.type != "cuda":
        return min(v_tiles, 3)  # still exercises the cross-split combine under the interpreter
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(v_tiles, math.ceil(4 * sms / n_blocks)))


def _linear_logprob_fwd_triton(hidden, weight, targets, temperature, return_entropy):
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    cfg = _config(dev, hidden.dtype)
    block_n, block_v = cfg["BLOCK_N"], cfg["BLOCK_V"]
    n_blocks, v_tiles = triton.cdiv(n, block_n), triton.cdiv(vocab, block_v)
    tiles_per_split = triton.cdiv(v_tiles, _num_splits(n_blocks, v_tiles, dev))
    num_splits = triton.cdiv(v_tiles, tiles_per_split)  # every split holds >= 1 tile

    f32 = dict(dtype=torch.float32, device=dev)
    part_max = _scratch((n, num_splits), **f32)
    part_sum = _scratch((n, num_splits), **f32)
    part_ent = _scratch((n, num_splits), **f32) if return_entropy else part_sum
    target_logit = torch.zeros((n,), **f32)
    _linear_logprob_fwd_kernel[(n_blocks * num_splits,)](
        hidden, weight, targets, part_max, part_sum, part_ent, target_logit,
        n, vocab, d, 1.0 / temperature, tiles_per_split, num_splits,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=cfg["BLOCK_D"], GROUP_N=cfg["GROUP_N"],
        HAS_ENTROPY=return_entropy, **_dot_flags(dev, hidden.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    # combine the splits: [N, S] -> [N]; all in shifted units so |logits| ~ 1e4 keeps precision
    row_max = part_max.max(dim=1).values
    scale = torch.exp(part_max - row_max[:, None])
    total = (part_sum * scale).sum(dim=1)
    lse = row_max + torch.log(total)
    logp = target_logit - lse
    entropy = None
    if return_entropy:
        shifted_mean = (scale * (part_ent + (part_max - row_max[:, None]) * part_sum)).sum(dim=1) / total
        entropy = torch.log(total) - shifted_mean
    return logp, entropy, lse


def _bwd_chunk_rows(n: int, vocab: int, elt: int) -> int:
    env = os.environ.get("CREDIT_BWD_CHUNK_ROWS")
    if env:
        return max(1, int(env))
    budget = 512 << 20  # bytes of dz per chunk
    if n * vocab * elt <= budget:
        return n
    return max(128, (budget // (vocab * elt)) // 128 * 128)


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with fp32 output from low-precision inputs (cuBLAS out_dtype where torch has it)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        acc += (a @ b).float()


def chunked_linear_backward(hidden, weight, needs_dh: bool, needs_dw: bool, write_dz):
    """d hidden = dz W and d weight = dz^T h, one row chunk of dz at a time (extra memory: chunk x V).

    write_dz(rows: slice, h [rows, d], dz [rows, V]) fills dz (hidden's dtype) with d loss / d (h W^T).
    d weight accumulates in fp32 when there are several chunks. Returns (d_hidden or None, d_weight or None).
    """
    n = hidden.shape[0]
    vocab = weight.shape[0]
    dev = hidden.device
    chunk = _bwd_chunk_rows(n, vocab, hidden.element_size())
    dz_buf = _scratch((min(chunk, n), vocab), dtype=hidden.dtype, device=dev)
    d_hidden = _scratch(hidden.shape, dtype=hidden.dtype, device=dev) if needs_dh else None
    single = chunk >= n
    d_weight = None
    if needs_dw:
        d_weight = (
            _scratch(weight.shape, dtype=weight.dtype, device=dev)
            if single
            else torch.zeros(weight.shape, dtype=torch.float32, device=dev)
        )
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        h = hidden[sl]
        dz = dz_buf[: sl.stop - start]
        write_dz(sl, h, dz)
        if needs_dh:
            torch.mm(dz, weight, out=d_hidden[sl])
        if needs_dw:
            if single:
                torch.mm(dz.T, h, out=d_weight)
            else:
                _addmm_fp32(d_weight, dz.T, h)
    if needs_dw and not single:
        d_weight = d_weight.to(weight.dtype)
    return d_hidden, d_weight


def _linear_logprob_bwd_triton(
    grad_logp, grad_entropy, grad_lse, hidden, weight, targets, lse, entropy, temperature, ignore_index,
    needs_dh, needs_dw,
):
    d = hidden.shape[1]
    vocab = weight.shape[0]
    dev = hidden.device
    cfg = _config(dev, hidden.dtype, "dz")
    dummy = lse  # stands in for absent row gradients (never read: the HAS_* flag is off)

    def write_dz(sl, h, dz):
        rows = h.shape[0]
        grid = (triton.cdiv(rows, cfg["BLOCK_N"]) * triton.cdiv(vocab, cfg["BLOCK_V"]),)
        _linear_logprob_bwd_kernel[grid](
            h, weight, targets[sl], lse[sl], entropy[sl] if grad_entropy is not None else dummy,
            grad_logp[sl] if grad_logp is not None else dummy,
            grad_entropy[sl] if grad_entropy is not None else dummy,
            grad_lse[sl] if grad_lse is not None else dummy,
            dz, rows, vocab, d, 1.0 / temperature, ignore_index,
            h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
            BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], GROUP_N=cfg["GROUP_N"],
            HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
            HAS_GRAD_LSE=grad_lse is not None, **_dot_flags(dev, hidden.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    return chunked_linear_backward(hidden, weight, needs_dh, needs_dw, write_dz)


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("credit::linear_logprob", mutates_args=())
def _linear_logprob_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [N], entropy [N] or [0], lse [N]), fp32; ignored rows are 0 in all three."""
    n = hidden.shape[0]
    if n == 0:
        e = _empty(hidden)
        return e, e.clone(), e.clone()
    if backend == "cpp":
        logp, entropy, lse = torch.ops.credit_C.linear_logprob_fwd(
            hidden, weight, targets, temperature, ignore_index, return_entropy, 0
        )
        return logp, entropy if return_entropy else _empty(hidden), lse
    if backend == "torch":
        outs = linear_logprob_ref(
            hidden, weight, targets, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, return_lse=True,
        )
        logp, lse = outs[0], outs[-1]
        return logp, outs[1] if return_entropy else _empty(hidden), lse
    # triton
    keep = targets != ignore_index
    logp, entropy, lse = _linear_logprob_fwd_triton(hidden, weight, targets, temperature, return_entropy)
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
    logp = torch.where(keep, logp, zero)
    lse = torch.where(keep, lse, zero)
    entropy = torch.where(keep, entropy, zero) if return_entropy else _empty(hidden)
    return logp, entropy, lse


@_linear_logprob_op.register_fake
def _(hidden, weight, targets, temperature, ignore_index, return_entropy, backend):
    torch._check(hidden.dim() == 2 and weight.dim() == 2 and targets.dim() == 1)
    torch._check(hidden.shape[1] == weight.shape[1])
    torch._check(targets.shape[0] == hidden.shape[0])
    n = hidden.shape[0]
    out = hidden.new_empty((n,), dtype=torch.float32)
    ent = hidden.new_empty((n if return_entropy else 0,), dtype=torch.float32)
    return out, ent, out.new_empty((n,))


@torch.library.custom_op("credit::linear_logprob_backward", mutates_args=())
def _linear_logprob_backward_op(
    grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    grad_lse: Optional[torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
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
            grad_logp, grad_entropy, grad_lse, hidden, weight, targets, lse, entropy, temperature, ignore_index,
            needs_hidden_grad, needs_weight_grad, 0,
        )
    if backend == "torch":
        dh, dw = linear_logprob_bwd_ref(
            grad_logp, grad_entropy, grad_lse, hidden, weight, targets, lse,
            entropy if grad_entropy is not None else None,
            temperature=temperature, ignore_index=ignore_index,
            needs_hidden_grad=needs_hidden_grad, needs_weight_grad=needs_weight_grad,
        )
    else:
        def rows(g):  # fp32, contiguous
            return None if g is None else g.float().contiguous()

        dh, dw = _linear_logprob_bwd_triton(
            rows(grad_logp), rows(grad_entropy), rows(grad_lse), hidden, weight, targets, lse.contiguous(),
            entropy.contiguous(), temperature, ignore_index, needs_hidden_grad, needs_weight_grad,
        )
    return (dh if dh is not None else empty_h, dw if dw is not None else empty_w)


@_linear_logprob_backward_op.register_fake
def _(grad_logp, grad_entropy, grad_lse, hidden, weight, targets, lse, entropy, temperature, ignore_index, backend,
      needs_hidden_grad, needs_weight_grad):
    return (hidden.new_empty(hidden.shape if needs_hidden_grad else (0,)),
            weight.new_empty(weight.shape if needs_weight_grad else (0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, temperature, ignore_index, return_entropy, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, targets, lse, entropy)
    ctx.args = (temperature, ignore_index, backend)


def _backward(ctx, grad_logp, grad_entropy, grad_lse):
    hidden, weight, targets, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, backend = ctx.args
    needs_dh, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (needs_dh or needs_dw):
        return None, None, None, None, None, None, None
    if grad_entropy is not None and grad_entropy.numel() == 0:
        grad_entropy = None  # entropy was not requested
    d_hidden, d_weight = _linear_logprob_backward_op(
        grad_logp, grad_entropy, grad_lse, hidden, weight, targets, lse, entropy,
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


def resolve_backend(backend: str, device: torch.device, op: str = "linear_logprob") -> str:
    """Map "auto" to a concrete backend for `device` and check that an explicit one can run there."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if HAS_TRITON else "torch"
        return "cpp" if _ext.use_ext(device) else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError(f"{op}: backend='triton' but triton is not installed (pip install triton)")
        if device.type != "cuda" and not INTERPRET:
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
                f"to run it on {device.type} tensors; use backend='auto'"
            )
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend='cpp' runs on CPU tensors only; got {device.type} tensors")
        if not _ext.HAS_EXT:
            raise ValueError(f"{op}: backend='cpp' but credit_kernels._C is not built ({_ext.EXT_ERROR})")
    return backend


def _validate(hidden, weight, targets, temperature):
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("linear_logprob: hidden and weight must be tensors")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"linear_logprob: targets must be an integer tensor; got {type(targets).__name__}")
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(
            f"linear_logprob: hidden must be [..., d] and weight [V, d]; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_logprob: hidden [..., d] and weight [V, d] must share d; got d={hidden.shape[-1]} and "
            f"weight {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_logprob: targets must have shape {tuple(hidden.shape[:-1])} matching hidden; got "
            f"{tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"linear_logprob: targets must be an integer tensor (int64); got {targets.dtype}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"linear_logprob: {name} must be fp32, bf16 or fp16; got {t.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"linear_logprob: hidden and weight must share a dtype; got {hidden.dtype} and {weight.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"linear_logprob: hidden, weight and targets must be on one device; got {hidden.device}, "
            f"{weight.device}, {targets.device}"
        )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"linear_logprob: temperature must be a finite number > 0; got {temperature!r}")
    if weight.shape[0] == 0:
        raise ValueError("linear_logprob: weight has V = 0 rows; the vocabulary must not be empty")


def _check_targets(targets, vocab, ignore_index):
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if bool(bad.any()):  # one device sync; opt out with check_inputs=False
        i = int(bad.nonzero()[0, 0]) if bad.dim() == 1 else tuple(bad.nonzero()[0].tolist())
        raise ValueError(
            f"linear_logprob: targets must lie in [0, V={vocab}) or equal ignore_index={ignore_index}; "
            f"targets[{i}] = {int(targets.reshape(-1)[bad.reshape(-1)][0])}"
        )


def _check_finite(logp, lse, hidden, weight):
    # NaN/inf in hidden or weight make the affected rows' lse non-finite (a defined result); checking the
    # [N] outputs is cheap, and only on failure do we scan the inputs to name the culprit.
    if bool(torch.isfinite(lse).all()) and not bool(torch.isnan(logp).any()):
        return
    for name, t in (("hidden", hidden), ("weight", weight)):
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            idx = tuple(bad.nonzero()[0].tolist())
            raise ValueError(f"linear_logprob: {name} contains NaN/inf (first at {name}{list(idx)} = {t[idx].item()})")
    raise ValueError("linear_logprob: logits overflowed to inf (hidden @ weight.T / temperature exceeds fp32 range)")


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
        hidden: [..., d] bf16/fp16/fp32, the final hidden states.
        weight: [V, d], same dtype (the LM head).
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

    Returns:
        logp [...] fp32; with return_entropy and/or return_lse a tuple (logp, entropy, lse)
        holding only the requested extras, in that order. All are differentiable w.r.t.
        hidden and weight (exact gradients, fp32 accumulation).
    """
    _validate(hidden, weight, targets, temperature)
    resolved = resolve_backend(backend, hidden.device)
    batch_shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).long()
    checking = check_inputs and not torch.compiler.is_compiling()
    if checking and t.numel():
        _check_targets(t, weight.shape[0], ignore_index)
    logp, entropy, lse = _linear_logprob_op(
        h, weight, t, float(temperature), int(ignore_index), bool(return_entropy), resolved
    )
    if checking and t.numel():
        _check_finite(logp, lse, hidden, weight)
    outs = [logp.reshape(batch_shape)]
    if return_entropy:
        outs.append(entropy.reshape(batch_shape))
    if return_lse:
        outs.append(lse.reshape(batch_shape))
    return outs[0] if len(outs) == 1 else tuple(outs)
