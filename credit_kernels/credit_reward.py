r"""CREDIT token rewards and per-response pMI diagnostics in one fused pass.

For response i, token t (mask m_it), with a = aligned [B, T], b^m = shuffled [M, B, T], s = student [B, T]
(docs/method.md; arXiv 2605.11613, which builds on SDPO, arXiv 2601.20802):

    beta     = mean_m b^m ("mean") or log(1/M sum_m exp b^m) ("logmeanexp")
    rewards  = (a - s) - lam * (beta - s)                       [B, T] fp32, +0.0 where the mask is 0
    pmi      = sum_t m (a - s)                                  [B] fp32
    contrastive_pmi = A - log(1/M sum_m exp B_m),  A = sum_t m a,  B_m = sum_t m b^m      [B] fp32
    contrastive_pmi_surrogate = sum_t m (a - mean_m b^m)        [B] fp32 (an upper bound of it, by Jensen)

The oracle is ``credit_kernels.reference.credit_reward_ref`` (which ``credit.credit_rewards`` and
``credit.sequence_pmi`` call after validating); it fixes the conventions every backend follows: inputs cast to fp32
and fp32 math, any non-zero mask entry counts as 1, masked outputs are exactly +0.0 by selection (NaN/inf there
never leak), "mean" is ``b.sum(0) / M``, "logmeanexp" is ``logsumexp(b, 0) - log M``, and lam in [0, 1].

Inputs are taken as given, whatever their strides (every kernel reads through them), and autocast does not apply:
the op has no matmul to speed up, its inputs are log-probs that the linear ops already return in fp32, and a
lower-precision pass would round the differences a - s and a - beta, which are the rewards themselves
(docs/kernels.md).

Backends (one custom op ``credit::credit_reward``; no autograd: the rewards are advantages, constants for the
policy gradient, so the inputs are detached):
    triton  CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests).
    cuda    the compiled CUDA kernel, csrc/cuda/credit_reward.cu (built when torch has CUDA).
    cpp     the compiled CPU kernel, csrc/credit_reward.cpp (multi-threaded over rows).
    torch   the oracle itself (credit_reward_ref), about 15 separate elementwise/reduction kernels.

Triton schedule: one program per block of BLOCK_B rows walks T in BLOCK_T tiles; per tile it sweeps the M partner
rows once (token-wise sum and max, and each partner's masked row sum, reduced into a [BLOCK_B, BLOCK_M]
accumulator), then computes the rewards and adds the pmi / A / surrogate terms into [BLOCK_B, BLOCK_T] fp32
accumulators that are reduced once at the end (pairwise-like, more accurate than a running scalar). The
logsumexp over the M row sums B_m finishes in the kernel. Every input element is read once ("logmeanexp"
re-reads each tile's partner values, from L1/L2, for its exp pass), the rewards are written once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from credit_kernels import _core
from credit_kernels._core import HAS_TRITON, INTERPRET  # noqa: F401  (bench/bench_credit_reward.py reads HAS_TRITON)
from credit_kernels.reference import credit_reward_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["BACKENDS", "MAX_PARTNERS", "CreditReward", "credit_reward", "resolve_backend"]

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")
# The kernels keep the M partner row sums on chip (registers / shared memory); CREDIT uses M <= P - 1 partners,
# a handful in practice, so 64 is generous.
MAX_PARTNERS = 64
# The compiled kernels take one dtype for aligned, shuffled and student; other combinations are cast to fp32
# first, which is exactly the oracle's `.float()`.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _credit_reward_fwd_kernel(
        aligned_ptr, shuffled_ptr, student_ptr, mask_ptr,
        rewards_ptr, pmi_ptr, contrastive_ptr, surrogate_ptr,
        B, T, M, lam, log_m,
        stride_aligned_b, stride_aligned_t,
        stride_shuffled_m, stride_shuffled_b, stride_shuffled_t,
        stride_student_b, stride_student_t,
        stride_mask_b, stride_mask_t,
        BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, LOGMEANEXP: tl.constexpr,
    ):
        """Rewards and row diagnostics of BLOCK_B rows.

        aligned [B, T], shuffled [M, B, T], student [B, T]: any float dtype, any strides (elements), upcast to
        fp32 on load. mask [B, T]: any real dtype (bool viewed as uint8), != 0 keeps. lam, log_m = log(M):
        fp32 scalars. Writes rewards [B, T] (contiguous) and pmi, contrastive, surrogate [B], all fp32; every
        sum accumulates in fp32.
        """
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        rows = offs_b.to(tl.int64)  # int64 offsets: M * B * T elements can pass 2^31
        offs_m = tl.arange(0, BLOCK_M)
        count = M * 1.0
        pmi_acc = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.float32)
        a_acc = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.float32)
        sur_acc = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.float32)
        part = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)  # B_m = sum_t m b^m, column m
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            cols = offs_t.to(tl.int64)
            inb = mask_b[:, None] & (offs_t < T)[None, :]
            keep = tl.load(mask_ptr + rows[:, None] * stride_mask_b + cols[None, :] * stride_mask_t, mask=inb, other=0)
            keep = inb & (keep != 0)
            b_ptrs = shuffled_ptr + rows[:, None] * stride_shuffled_b + cols[None, :] * stride_shuffled_t
            # 1. one sweep over the partners: token-wise sum (a left fold from 0, as torch's b.sum(0) for small M)
            #    and max, and each partner's masked row sum. Masked tokens are never loaded (other=0) and are
            #    selected out (tl.where) everywhere, so NaN/inf there cannot leak.
            b_sum = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.float32)
            b_max = tl.full((BLOCK_B, BLOCK_T), float("-inf"), dtype=tl.float32)
            b_m_ptrs = b_ptrs  # advanced by one partner stride per step: m * stride in int32 could overflow
            for m in range(0, M):
                b = tl.load(b_m_ptrs, mask=keep, other=0.0).to(tl.float32)
                b_m_ptrs += stride_shuffled_m
                b_sum += b
                if LOGMEANEXP:
                    b_max = tl.maximum(b_max, b)
                row_b = tl.sum(tl.where(keep, b, 0.0), axis=1)
                part = tl.where(offs_m[None, :] == m, part + row_b[:, None], part)
            # 2. beta in the oracle's order: b.sum(0) / M (div_rn: the GPU's default fp32 `/` is approximate), or
            #    torch.logsumexp (shift = the max, +-inf replaced by 0) minus log M.
            beta_mean = tl.math.div_rn(b_sum, count)
            if LOGMEANEXP:
                shift = tl.where(tl.abs(b_max) == float("inf"), 0.0, b_max)
                e = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.float32)
                b_m_ptrs = b_ptrs
                for m in range(0, M):
                    b = tl.load(b_m_ptrs, mask=keep, other=0.0).to(tl.float32)
                    b_m_ptrs += stride_shuffled_m
                    e += tl.exp(b - shift)
                beta = (tl.log(e) + shift) - log_m
            else:
                beta = beta_mean
            # 3. r = (a - s) - lam * (beta - s), +0.0 where masked; the row terms.
            a = tl.load(aligned_ptr + rows[:, None] * stride_aligned_b + cols[None, :] * stride_aligned_t,
                        mask=keep, other=0.0).to(tl.float32)
            s = tl.load(student_ptr + rows[:, None] * stride_student_b + cols[None, :] * stride_student_t,
                        mask=keep, other=0.0).to(tl.float32)
            sd = a - s
            r = sd - lam * (beta - s)
            tl.store(rewards_ptr + rows[:, None] * T + cols[None, :], tl.where(keep, r, 0.0), mask=inb)
            pmi_acc += tl.where(keep, sd, 0.0)
            a_acc += tl.where(keep, a, 0.0)
            sur_acc += tl.where(keep, a - beta_mean, 0.0)

        # 4. finish the rows: contrastive pMI = A - (logsumexp_m B_m - log M), torch's logsumexp again.
        valid_m = offs_m[None, :] < M
        mx = tl.max(tl.where(valid_m, part, float("-inf")), axis=1)
        shift = tl.where(tl.abs(mx) == float("inf"), 0.0, mx)
        # padded columns (m >= M) are -inf before the exp, so they add exactly 0 and never overflow
        lse = tl.log(tl.sum(tl.exp(tl.where(valid_m, part - shift[:, None], float("-inf"))), axis=1)) + shift
        a_sum = tl.sum(a_acc, axis=1)
        tl.store(pmi_ptr + offs_b, tl.sum(pmi_acc, axis=1), mask=mask_b)
        tl.store(contrastive_ptr + offs_b, a_sum - (lse - log_m), mask=mask_b)
        tl.store(surrogate_ptr + offs_b, tl.sum(sur_acc, axis=1), mask=mask_b)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def _output(shape, device) -> torch.Tensor:
    return _core.scratch(shape, dtype=torch.float32, device=device)


def _config(n_rows: int, n_tokens: int, n_partners: int, device: torch.device) -> dict:
    """Tile sizes. GPU: ~2048-element tiles, and rows per program lowered until there are >= 2 programs per SM;
    a starting point for a memory-bound op, not yet tuned on a card."""
    np2 = triton.next_power_of_2
    block_m = max(2, np2(n_partners))
    if device.type != "cuda":  # interpreter: few, large programs (it costs ~ms per loop iteration)
        return dict(BLOCK_B=min(16, np2(max(n_rows, 1))), BLOCK_T=max(16, min(512, np2(max(n_tokens, 1)))),
                    BLOCK_M=block_m, num_warps=4)
    block_t = max(128, min(2048, np2(max(n_tokens, 1))))
    block_b = max(1, min(np2(max(n_rows, 1)), 2048 // block_t))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    while block_b > 1 and triton.cdiv(n_rows, block_b) < 2 * sms:
        block_b //= 2
    return dict(BLOCK_B=block_b, BLOCK_T=block_t, BLOCK_M=block_m, num_warps=8 if block_b * block_t >= 2048 else 4)


def _credit_reward_fwd_triton(aligned, shuffled, student, mask, lam, baseline):
    n_rows, n_tokens = aligned.shape
    n_partners = shuffled.shape[0]
    dev = aligned.device
    rewards = _output((n_rows, n_tokens), dev)
    pmi, contrastive, surrogate = (_output((n_rows,), dev) for _ in range(3))
    if n_rows == 0:
        return rewards, pmi, contrastive, surrogate
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; loads as integers and compares != 0
    cfg = _config(n_rows, n_tokens, n_partners, dev)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_B"]),)
    _credit_reward_fwd_kernel[grid](
        aligned, shuffled, student, mask, rewards, pmi, contrastive, surrogate,
        n_rows, n_tokens, n_partners, float(lam), math.log(n_partners),
        aligned.stride(0), aligned.stride(1),
        shuffled.stride(0), shuffled.stride(1), shuffled.stride(2),
        student.stride(0), student.stride(1),
        mask.stride(0), mask.stride(1),
        BLOCK_B=cfg["BLOCK_B"], BLOCK_T=cfg["BLOCK_T"], BLOCK_M=cfg["BLOCK_M"],
        LOGMEANEXP=baseline == "logmeanexp", num_warps=cfg["num_warps"],
    )
    return rewards, pmi, contrastive, surrogate


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------


def _same_kernel_dtype(aligned, shuffled, student):
    dt = aligned.dtype
    if dt in _KERNEL_DTYPES and shuffled.dtype == dt and student.dtype == dt:
        return aligned, shuffled, student
    return aligned.float(), shuffled.float(), student.float()


@torch.library.custom_op("credit::credit_reward", mutates_args=())
@_core.no_autocast
def _credit_reward_op(
    aligned: torch.Tensor,
    shuffled: torch.Tensor,
    student: torch.Tensor,
    mask: torch.Tensor,
    lam: float,
    baseline: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rewards [B, T], pmi [B], contrastive_pmi [B], contrastive_pmi_surrogate [B]), all fp32."""
    if backend == "torch":
        return credit_reward_ref(aligned, shuffled, student, mask, lam=lam, baseline=baseline)
    if backend in ("cpp", "cuda"):
        a, sh, s = _same_kernel_dtype(aligned, shuffled, student)
        return tuple(torch.ops.credit_C.credit_reward(a, sh, s, mask, lam, baseline))
    return _credit_reward_fwd_triton(aligned, shuffled, student, mask, lam, baseline)


@_credit_reward_op.register_fake
def _(aligned, shuffled, student, mask, lam, baseline, backend):
    torch._check(aligned.dim() == 2 and shuffled.dim() == 3 and student.dim() == 2 and mask.dim() == 2)
    torch._check(shuffled.shape[1] == aligned.shape[0] and shuffled.shape[2] == aligned.shape[1])
    n_rows, n_tokens = aligned.shape
    rewards = aligned.new_empty((n_rows, n_tokens), dtype=torch.float32)
    return rewards, *(aligned.new_empty((n_rows,), dtype=torch.float32) for _ in range(3))


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


class CreditReward(NamedTuple):
    """The fused op's outputs, all fp32 on the inputs' device (definitions in the module docstring)."""

    rewards: torch.Tensor
    """[B, T] CREDIT token rewards (a - s) - lam * (beta - s), exactly +0.0 where the mask is 0."""
    pmi: torch.Tensor
    """[B] sum_t m (a - s): SDPO's sequence reward, pMI(y; f | x) under posterior compatibility."""
    contrastive_pmi: torch.Tensor
    """[B] A - log(1/M sum_m exp B_m), A = sum_t m a, B_m = sum_t m b^m."""
    contrastive_pmi_surrogate: torch.Tensor
    """[B] sum_t m (a - mean_m b^m), the token-decomposable upper bound of contrastive_pmi (Jensen)."""


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend for `device` and check that an explicit one can run there.

    As linear_logprob's, plus "cuda" (the compiled kernel), which "auto" picks on CUDA without Triton.
    """
    return _core.resolve_backend("credit_reward", backend, device, choices=BACKENDS, cpp_op="credit_reward")


def credit_reward(
    aligned: torch.Tensor,
    shuffled: torch.Tensor,
    student: torch.Tensor,
    mask: torch.Tensor,
    *,
    lam: float = 0.5,
    baseline: str = "mean",
    backend: str = "auto",
    check_inputs: bool = True,
) -> CreditReward:
    """CREDIT token rewards and the per-response pMI diagnostics, fused: one read of every input.

    Equal to ``credit_reward_ref`` (the oracle, backend="torch"; ``credit.credit_rewards`` and ``credit.sequence_pmi``
    are its validated halves) up to fp32 summation order. Outputs carry no gradient: the rewards are advantages
    (stop-gradient) in the update.

    Args:
        aligned: [B, T] bf16/fp16/fp32 (any float dtype, any strides), the aligned teacher's log-probs
            a = log T(y_t | c(x, f), y_<t).
        shuffled: [M, B, T] float, 1 <= M <= 64, the shuffled teachers' log-probs b^m = log T(y_t | c(x_m, f), y_<t).
        student: [B, T] float, the student's log-probs s.
        mask: [B, T] bool or real numbers; any non-zero entry counts as 1.
        lam: debiasing weight in [0, 1] (0 = SDPO, 1 = a - beta); outside raises ValueError.
        baseline: "mean" (beta = mean_m b^m) or "logmeanexp" (beta = logsumexp_m b^m - log M).
        backend: "auto" (CUDA -> "triton", or "cuda" without Triton; CPU -> "cpp" if the extension is built, else
            "torch"), "triton" (CPU tensors only under TRITON_INTERPRET=1), "cuda" (the compiled CUDA kernel),
            "cpp" (the compiled CPU kernel), "torch" (the oracle, credit_kernels.reference.credit_reward_ref).
        check_inputs: raise ValueError, naming the input, if any input holds NaN/inf at an unmasked position. It
            costs one device sync on the [B] outputs (a non-finite unmasked input always makes pmi or the
            surrogate non-finite), and the input scan runs only then. Skipped under torch.compile. With
            check_inputs=False the affected outputs come out NaN/inf, as the oracle's do.

    Returns:
        CreditReward(rewards [B, T], pmi [B], contrastive_pmi [B], contrastive_pmi_surrogate [B]), fp32.
    """
    fn = "credit_reward"
    lam = _core.check_lam(fn, lam)
    _core.check_baseline(fn, baseline)
    _core.check_reward_inputs(fn, aligned, shuffled, student, mask)
    if shuffled.shape[0] > MAX_PARTNERS:
        raise ValueError(
            f"{fn}: shuffled has M = {shuffled.shape[0]} partners; the fused op supports 1 <= M <= {MAX_PARTNERS} "
            "(the per-partner row sums stay on chip); use credit.credit_rewards / credit.sequence_pmi for more"
        )
    resolved = resolve_backend(backend, aligned.device)
    out = CreditReward(*_credit_reward_op(
        aligned.detach(), shuffled.detach(), student.detach(), mask.detach(), lam, baseline, resolved
    ))
    if check_inputs and not torch.compiler.is_compiling() and out.pmi.numel():
        # one sync: a NaN/inf at an unmasked input position makes pmi (a, s) or the surrogate (a, b) non-finite
        _core.check_finite_outputs(
            fn, torch.isfinite(out.pmi).all() & torch.isfinite(out.contrastive_pmi_surrogate).all(),
            {"aligned": aligned, "shuffled": shuffled, "student": student},
            keep=mask if mask.dtype == torch.bool else mask != 0,
            overflow="a row sum overflowed fp32 (|sum_t a|, |sum_t s| or |sum_t b| exceeds 3.4e38)",
        )
    return out
