r"""Token rewards of SDPO and CREDIT, and per-response pMI diagnostics, on plain tensors.

The method is described in CREDIT.md and in "From Generic Correlation to Input-Specific
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

Output conventions (these functions are the oracle of the fused ``credit_kernels.credit_reward`` op, which must
follow them):

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

import math
import numbers
from typing import NamedTuple

import torch

__all__ = ["SequencePMI", "credit_rewards", "sdpo_rewards", "sequence_pmi"]

_BASELINES = ("mean", "logmeanexp")


# ---------------------------------------------------------------------------------------------------------------------
# validation helpers (shared with credit.losses)


def _check_float_tensor(fn: str, name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor (log-probs); got dtype {x.dtype}")


def _check_mask(fn: str, mask, shape: torch.Size, shape_desc: str) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{fn}: mask must be a torch.Tensor; got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{fn}: mask must be bool or real 0/1 numbers; got dtype {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"{fn}: mask must have shape {shape_desc} = {tuple(shape)}; got {tuple(mask.shape)}")


def _check_same_shape(fn: str, name: str, x: torch.Tensor, shape: torch.Size, shape_desc: str) -> None:
    if x.shape != shape:
        raise ValueError(f"{fn}: {name} must have shape {shape_desc} = {tuple(shape)}; got {tuple(x.shape)}")


def _check_devices(fn: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        got = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{fn}: all tensors must be on the same device; got {got}")


def _check_finite(fn: str, name: str, x: torch.Tensor, keep: torch.Tensor) -> None:
    """Raise if x holds NaN/inf where `keep` (broadcastable bool) is True. Syncs the device once."""
    bad = ~torch.isfinite(x) & keep
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(
            f"{fn}: {name} has {int(bad.sum())} non-finite (NaN/inf) value(s) at unmasked positions, first at "
            f"index {idx} (value {x[tuple(idx)].item()}); pass check_inputs=False to skip this scan"
        )


def _check_lam(fn: str, lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"{fn}: lam must be a real number in [0, 1]; got {type(lam).__name__} {lam!r}")
    lam = float(lam)
    if not (0.0 <= lam <= 1.0):  # also rejects NaN
        raise ValueError(
            f"{fn}: lam must be in [0, 1] (0 = SDPO, 1 = pure contrast a - beta); got {lam}. Values outside the "
            "interval extrapolate past the method and are rejected"
        )
    return lam


def _check_baseline(fn: str, baseline) -> None:
    if baseline not in _BASELINES:
        raise ValueError(f"{fn}: baseline must be one of {_BASELINES}; got {baseline!r}")


def _keep(mask: torch.Tensor) -> torch.Tensor:
    """Masks are bool or 0/1 numbers: any non-zero entry counts as 1."""
    return mask if mask.dtype == torch.bool else mask != 0


def _baseline(b: torch.Tensor, baseline: str) -> torch.Tensor:
    """beta over the leading (M) dim of fp32 `b`: mean or log-mean-exp (see the module docstring)."""
    num = b.shape[0]
    if baseline == "mean":
        return b.sum(0) / num
    return torch.logsumexp(b, 0) - math.log(num)


def _check_triple(fn: str, aligned, shuffled, student, mask) -> None:
    """Shapes: aligned, student, mask [B, T]; shuffled [M, B, T] with M >= 1."""
    _check_float_tensor(fn, "aligned", aligned)
    _check_float_tensor(fn, "shuffled", shuffled)
    _check_float_tensor(fn, "student", student)
    if aligned.dim() != 2:
        raise ValueError(f"{fn}: aligned must have shape [B, T]; got {tuple(aligned.shape)}")
    _check_same_shape(fn, "student", student, aligned.shape, "[B, T]")
    _check_mask(fn, mask, aligned.shape, "[B, T]")
    if shuffled.dim() != 3 or shuffled.shape[1:] != aligned.shape:
        raise ValueError(
            f"{fn}: shuffled must have shape [M, B, T] = [M, {aligned.shape[0]}, {aligned.shape[1]}] matching "
            f"aligned; got {tuple(shuffled.shape)}"
        )
    if shuffled.shape[0] == 0:
        raise ValueError(
            f"{fn}: shuffled has M = 0 partners; CREDIT needs M >= 1 shuffled teacher passes (use sdpo_rewards for "
            "lam = 0 without partners)"
        )
    _check_devices(fn, aligned=aligned, shuffled=shuffled, student=student, mask=mask)


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
    a, s = aligned.float(), student.float()
    beta = _baseline(shuffled.float(), baseline)
    r = (a - s) - lam * (beta - s)
    return torch.where(keep, r, torch.zeros((), dtype=torch.float32, device=r.device))


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
    zero = torch.zeros((), dtype=torch.float32, device=aligned.device)
    a = torch.where(keep, aligned.float(), zero)
    s = torch.where(keep, student.float(), zero)
    b = torch.where(keep, shuffled.float(), zero)  # keep [B, T] broadcasts over M
    num = shuffled.shape[0]
    a_sum = a.sum(-1)  # [B]
    b_sum = b.sum(-1)  # [M, B]
    pmi = (a - s).sum(-1)
    contrastive = a_sum - (torch.logsumexp(b_sum, 0) - math.log(num))
    surrogate = (a - b.sum(0) / num).sum(-1)
    return SequencePMI(pmi, contrastive, surrogate)
