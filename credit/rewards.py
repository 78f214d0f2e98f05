r"""Token rewards of SDPO and CREDIT, and per-response pMI diagnostics, on plain tensors.

The method is described in docs/method.md and in "From Generic Correlation to Input-Specific
Credit in On-Policy Self Distillation" (arXiv 2605.11613), which builds on SDPO (arXiv 2601.20802).

For response i, token t (mask m_it):

* s_it   = log S(y_it | x, y_<t)                  student log-prob, ``student``  [B, T]
* a_it   = log T(y_it | c(x, f_i), y_<t)          aligned teacher, ``aligned``   [B, T]
* b^m_it = log T(y_it | c(x_m, f_i), y_<t)        shuffled teacher, ``shuffled`` [M, B, T]
* beta   = mean_m b^m ("mean", default) or log(1/M sum_m exp b^m) ("logmeanexp")

SDPO reward:   r_sd = a - s.
CREDIT reward: r_cr = (1 - lam) r_sd + lam (a - beta) = a - s - lam (beta - s).
lam = 0 is SDPO, lam = 1 the pure contrast a - beta.

Per response (sums over masked tokens):

* pMI                        = sum_t m (a - s)
* contrastive pMI            = A - log(1/M sum_m exp B_m),  A = sum_t m a,  B_m = sum_t m b^m
* its token-decomposable surrogate = sum_t m (a - mean_m b^m)  (an upper bound of the contrastive pMI, by Jensen)

Output conventions (these functions validate, then call the oracle of the fused ``credit_kernels.credit_reward`` op,
``credit_kernels.reference.credit_reward_ref``, whose halves they are; every backend of the op follows them):

* Every input is cast to fp32 first and all arithmetic is fp32; outputs are fp32 on the inputs' device.
* Masks are bool or 0/1 numbers; any non-zero entry counts as 1.
* Outputs are exactly 0.0 wherever the mask is 0, whatever the inputs hold there (NaN, inf, garbage): masking
  uses ``torch.where``, never a multiplication.
* beta "mean" is ``b.sum(0) / M``; "logmeanexp" is ``torch.logsumexp(b, 0) - log(M)``.
* r_cr is evaluated as ``(a - s) - lam * (beta - s)``.
* ``lam`` must be a real number in [0, 1]; outside that range the functions raise ValueError (the method
  interpolates between SDPO and the pure contrast; extrapolating past either end is not part of it).
* NaN or +-inf at unmasked positions raise ValueError naming the argument (one device sync per input);
  ``check_inputs=False`` skips those scans for hot paths. Shape, dtype and option checks always run.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# The validators and the oracle live with the kernels (credit_kernels stands alone); the names below are what
# credit.losses imports.
from credit_kernels._core import check_baseline as _check_baseline
from credit_kernels._core import check_devices as _check_devices
from credit_kernels._core import check_finite as _check_finite
from credit_kernels._core import check_float_tensor as _check_float_tensor
from credit_kernels._core import check_lam as _check_lam
from credit_kernels._core import check_mask as _check_mask
from credit_kernels._core import check_reward_inputs as _check_triple
from credit_kernels._core import check_same_shape as _check_same_shape
from credit_kernels.reference import credit_token_rewards_ref, sequence_pmi_ref
from credit_kernels.reference import keep_mask as _keep
from credit_kernels.reference import partner_baseline as _baseline  # noqa: F401

__all__ = ["SequencePMI", "credit_rewards", "sdpo_rewards", "sequence_pmi"]


# ---------------------------------------------------------------------------------------------------------------------
# public API


def sdpo_rewards(
    aligned: torch.Tensor, student: torch.Tensor, mask: torch.Tensor, *, check_inputs: bool = True
) -> torch.Tensor:
    """SDPO token rewards r = a - s, exactly 0 where mask is 0.

    Args:
        aligned: [B, T] float, log T(y_t | c(x, f), y_<t), the aligned teacher's log-probs of the response tokens.
        student: [B, T] float, log S(y_t | x, y_<t), the student's log-probs.
        mask: [B, T] bool or 0/1 numbers, 1 on response tokens that get a reward.
        check_inputs: scan unmasked positions for NaN/inf and raise ValueError (one device sync per input).

    Returns:
        [B, T] fp32 token rewards.
    """
    fn = "sdpo_rewards"
    _check_float_tensor(fn, "aligned", aligned)
    _check_float_tensor(fn, "student", student)
    if aligned.dim() != 2:
        raise ValueError(f"{fn}: aligned must have shape [B, T]; got {tuple(aligned.shape)}")
    _check_same_shape(fn, "student", student, aligned.shape, "[B, T]")
    _check_mask(fn, mask, aligned.shape, "[B, T]")
    _check_devices(fn, aligned=aligned, student=student, mask=mask)
    keep = _keep(mask)
    if check_inputs:
        _check_finite(fn, "aligned", aligned, keep)
        _check_finite(fn, "student", student, keep)
    r = aligned.float() - student.float()
    return torch.where(keep, r, torch.zeros((), dtype=torch.float32, device=r.device))


def credit_rewards(
    aligned: torch.Tensor,
    shuffled: torch.Tensor,
    student: torch.Tensor,
    mask: torch.Tensor,
    *,
    lam: float = 0.5,
    baseline: str = "mean",
    check_inputs: bool = True,
) -> torch.Tensor:
    """CREDIT token rewards r = a - s - lam * (beta - s), exactly 0 where mask is 0.

    Args:
        aligned: [B, T] float, the aligned teacher's log-probs a = log T(y_t | c(x, f), y_<t).
        shuffled: [M, B, T] float, M >= 1, the shuffled teachers' log-probs b^m = log T(y_t | c(x_m, f), y_<t).
        student: [B, T] float, the student's log-probs s.
        mask: [B, T] bool or 0/1 numbers.
        lam: debiasing weight in [0, 1] (0 = SDPO, 1 = a - beta); outside [0, 1] raises ValueError.
        baseline: "mean" (beta = mean_m b^m) or "logmeanexp" (beta = logsumexp_m b^m - log M).
        check_inputs: scan unmasked positions of every input for NaN/inf and raise ValueError.

    Returns:
        [B, T] fp32 token rewards (see the module docstring for the exact evaluation order).
    """
    fn = "credit_rewards"
    lam = _check_lam(fn, lam)
    _check_baseline(fn, baseline)
    _check_triple(fn, aligned, shuffled, student, mask)
    keep = _keep(mask)
    if check_inputs:
        _check_finite(fn, "aligned", aligned, keep)
        _check_finite(fn, "shuffled", shuffled, keep)
        _check_finite(fn, "student", student, keep)
    return credit_token_rewards_ref(aligned, shuffled, student, mask, lam=lam, baseline=baseline)


class SequencePMI(NamedTuple):
    """Per-response diagnostics, each [B] fp32 (0 for a response with no unmasked token)."""

    pmi: torch.Tensor
    """sum_t m (a - s): SDPO's sequence reward, pMI(y; f | x) under posterior compatibility."""
    contrastive_pmi: torch.Tensor
    """A - log(1/M sum_m exp B_m) with A = sum_t m a, B_m = sum_t m b^m: log T(y|x,f) - log mean_m T(y|x_m,f)."""
    contrastive_pmi_surrogate: torch.Tensor
    """sum_t m (a - mean_m b^m): the token-decomposable upper bound of contrastive_pmi (Jensen)."""


def sequence_pmi(
    aligned: torch.Tensor,
    shuffled: torch.Tensor,
    student: torch.Tensor,
    mask: torch.Tensor,
    *,
    check_inputs: bool = True,
) -> SequencePMI:
    """Per-response pMI, contrastive pMI and its token-decomposable surrogate.

    Args:
        aligned: [B, T] float, aligned teacher log-probs a.
        shuffled: [M, B, T] float, M >= 1, shuffled teacher log-probs b^m.
        student: [B, T] float, student log-probs s.
        mask: [B, T] bool or 0/1 numbers.
        check_inputs: scan unmasked positions of every input for NaN/inf and raise ValueError.

    Returns:
        SequencePMI(pmi, contrastive_pmi, contrastive_pmi_surrogate), each [B] fp32. Sums run over the T dim of
        the masked fp32 values (masked positions contribute exactly 0). contrastive_pmi is
        ``A - (torch.logsumexp(Bm, 0) - log(M))``.
    """
    fn = "sequence_pmi"
    _check_triple(fn, aligned, shuffled, student, mask)
    keep = _keep(mask)
    if check_inputs:
        _check_finite(fn, "aligned", aligned, keep)
        _check_finite(fn, "shuffled", shuffled, keep)
        _check_finite(fn, "student", student, keep)
    return SequencePMI(*sequence_pmi_ref(aligned, shuffled, student, mask))
