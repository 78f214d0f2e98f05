r"""Losses and advantages for SDPO / CREDIT updates: pure functions, tensors in, tensors out.

See docs/method.md ("The update", "The logit-level variant") and arXiv 2605.11613 (CREDIT), arXiv 2601.20802 (SDPO). Options are keyword-only.

Sampled-token policy gradient (on-policy, token-mean):

    loss = - sum_it m_it * w_it * sg(A_it) * s_it / sum_it m_it,   w_it = sg(min(exp(s_it - s_old_it), is_clip))

with A the token advantages, e.g. A = mu * A_grpo + (1 - mu) * r (``mix_advantages``), r the SDPO/CREDIT token
rewards (``credit.rewards``) and A_grpo the group-normalised outcome advantages (``grpo_advantages``).

Logit-level distillation (SDPO's default loss) over the student's top-k ids per position plus a tail bucket
log(1 - sum_topk p). The divergence convention follows TRL's ``trl/experimental/sdpo/loss_utils.py``
(``compute_divergence``), with S the student and T the teacher distributions over the buckets:

* alpha = 0: forward KL(T || S) = sum_v T (log T - log S)
* alpha = 1: reverse KL(S || T) = sum_v S (log S - log T)
* 0 < alpha < 1: generalised JSD_alpha = alpha KL(T || Mix) + (1 - alpha) KL(S || Mix), Mix = alpha T + (1 - alpha) S.
  JSD_alpha -> 0 as alpha -> 0 or 1; the two endpoints are the KLs above (as in TRL), not the limits.

CREDIT at logit level replaces T by the contrastive teacher

    log T~(v) = log T(v | c(x, f)) + lam * (s(v) - beta(v)) - log Z,   beta = mean_m b^m or logmeanexp_m b^m,

renormalised over the buckets (lam = 0 gives SDPO's teacher). Its sampled-token value log T~(y) - s(y) equals the
CREDIT token reward a - s - lam (beta - s) minus log Z.

Masks are bool or 0/1 numbers (non-zero counts as 1); masked positions are exactly 0 in every per-token output and
never reach a loss (``torch.where``, so NaN/inf there cannot leak into values or gradients). Token means divide by
max(sum m, 1), so an all-masked batch gives a zero loss with zero gradients.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from credit.pairing import _as_group_tensor
from credit.rewards import (
    _baseline,
    _check_baseline,
    _check_devices,
    _check_float_tensor,
    _check_lam,
    _check_mask,
    _check_same_shape,
    _keep,
)

__all__ = [
    "ContrastiveTeacher",
    "TopkDivergence",
    "contrastive_teacher_topk",
    "grpo_advantages",
    "mix_advantages",
    "policy_gradient_loss",
    "topk_divergence",
]

# Tail log-mass is computed from log S_k = logsumexp(top-k) clamped to <= this, so a top-k that holds (numerically)
# all the mass still gets a finite tail, log(1e-7) ~ -16.1, as in TRL's add_tail_bucket; -inf tails would turn the
# KL terms into 0 * inf = NaN.
_TAIL_LOG_MASS_MAX = -1e-7


def _check_real(fn: str, name: str, v, *, lo=None, hi=None, lo_open=False, allow_none=False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number; got {type(v).__name__} {v!r}")
    v = float(v)
    ok = math.isfinite(v)
    if lo is not None:
        ok = ok and (v > lo if lo_open else v >= lo)
    if hi is not None:
        ok = ok and v <= hi
    if not ok:
        lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_s = "" if hi is None else f"<= {hi}"
        want = " and ".join(s for s in (lo_s, hi_s) if s) or "finite"
        raise ValueError(f"{fn}: {name} must be {want}; got {v}")
    return v


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def _masked_token_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    total = torch.where(keep, values, _zero(values)).sum()
    return total / keep.sum().clamp(min=1).to(values.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# sampled-token policy gradient


def policy_gradient_loss(
    student_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    is_clip: float | None = 2.0,
) -> torch.Tensor:
    """Token-mean policy-gradient loss with stop-gradient advantages and a clamped importance ratio.

    loss = - sum m * w * sg(A) * s / max(sum m, 1), w = sg(min(exp(s - s_old), is_clip)), w = 1 without old_logp.

    Args:
        student_logp: [B, T] float, log-probs s of the sampled tokens under the current policy (requires grad).
        advantages: [B, T] float, token advantages A (detached inside).
        mask: [B, T] bool or 0/1 numbers.
        old_logp: [B, T] float or None, log-probs under the policy that sampled the tokens; None = on-policy (w = 1).
        is_clip: upper clamp of the importance ratio (> 0), or None for no clamp. SDPO's default is 2.

    Returns:
        Scalar fp32 loss; its gradient w.r.t. student_logp is -m * w * A / max(sum m, 1).
    """
    fn = "policy_gradient_loss"
    _check_float_tensor(fn, "student_logp", student_logp)
    _check_float_tensor(fn, "advantages", advantages)
    if student_logp.dim() != 2:
        raise ValueError(f"{fn}: student_logp must have shape [B, T]; got {tuple(student_logp.shape)}")
    _check_same_shape(fn, "advantages", advantages, student_logp.shape, "[B, T]")
    _check_mask(fn, mask, student_logp.shape, "[B, T]")
    if old_logp is not None:
        _check_float_tensor(fn, "old_logp", old_logp)
        _check_same_shape(fn, "old_logp", old_logp, student_logp.shape, "[B, T]")
    is_clip = _check_real(fn, "is_clip", is_clip, lo=0.0, lo_open=True, allow_none=True)
    _check_devices(fn, student_logp=student_logp, advantages=advantages, mask=mask, old_logp=old_logp)

    keep = _keep(mask)
    s = student_logp.float()
    coef = advantages.detach().float()
    if old_logp is not None:
        ratio = torch.exp(s.detach() - old_logp.detach().float())
        if is_clip is not None:
            ratio = ratio.clamp(max=is_clip)
        coef = coef * ratio
    per_token = -coef * torch.where(keep, s, _zero(s))  # masked s -> 0 first, so -inf/NaN padding cannot leak
    return _masked_token_mean(per_token, keep)


# ---------------------------------------------------------------------------------------------------------------------
# advantages


def grpo_advantages(
    rewards: torch.Tensor, group_ids, *, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO outcome advantages: A_i = (r_i - mean_g(i) r) / (std_g(i) r + eps), std unbiased (as TRL's GRPO).

    Args:
        rewards: [B] float, scalar outcome reward per response.
        group_ids: [B] integer tensor or list of ints (any values, any group sizes).
        normalize_std: divide by the group's std + eps (False: mean-centring only, as Dr. GRPO / nanochat).
        eps: added to the std (> 0).

    Returns:
        [B] fp32 advantages. A group of one response gets 0 (its std is undefined and treated as 0).
    """
    fn = "grpo_advantages"
    _check_float_tensor(fn, "rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"{fn}: rewards must have shape [B]; got {tuple(rewards.shape)}")
    gid = _as_group_tensor(fn, group_ids)
    if gid.shape != rewards.shape:
        raise ValueError(f"{fn}: group_ids must have shape [B] = [{rewards.shape[0]}]; got {tuple(gid.shape)}")
    eps = _check_real(fn, "eps", eps, lo=0.0, lo_open=True)
    r = rewards.float()
    _, inverse, counts = torch.unique(gid.to(r.device), return_inverse=True, return_counts=True)
    num_groups = counts.numel()
    counts = counts.to(r.dtype)
    mean = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(0, inverse, r) / counts
    centred = r - mean[inverse]
    if not normalize_std:
        return centred
    sq = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(0, inverse, centred * centred)
    std = torch.sqrt(sq / (counts - 1).clamp(min=1))  # unbiased; 0 for a single response
    return centred / (std[inverse] + eps)


def mix_advantages(
    token_rewards: torch.Tensor,
    grpo_adv: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    mu: float = 0.0,
    normalize: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Token advantages A = mu * A_grpo (broadcast over T) + (1 - mu) * r, exactly 0 where mask is 0.

    Args:
        token_rewards: [B, T] float, token rewards r (SDPO or CREDIT).
        grpo_adv: [B] float outcome advantages, or None when mu = 0.
        mask: [B, T] bool or 0/1 numbers.
        mu: weight of the outcome advantage, in [0, 1] (CREDIT's default 0: pure token rewards).
        normalize: first standardise r over the masked tokens of the whole batch: (r - mean) / (std + eps), std
            biased (population) over the sum(m) tokens.
        eps: added to the std when normalising (> 0).

    Returns:
        [B, T] fp32 advantages.
    """
    fn = "mix_advantages"
    _check_float_tensor(fn, "token_rewards", token_rewards)
    if token_rewards.dim() != 2:
        raise ValueError(f"{fn}: token_rewards must have shape [B, T]; got {tuple(token_rewards.shape)}")
    _check_mask(fn, mask, token_rewards.shape, "[B, T]")
    mu = _check_real(fn, "mu", mu, lo=0.0, hi=1.0)
    eps = _check_real(fn, "eps", eps, lo=0.0, lo_open=True)
    if grpo_adv is None:
        if mu != 0.0:
            raise ValueError(f"{fn}: grpo_adv is None but mu = {mu}; pass [B] outcome advantages or mu=0")
    else:
        _check_float_tensor(fn, "grpo_adv", grpo_adv)
        _check_same_shape(fn, "grpo_adv", grpo_adv, token_rewards.shape[:1], "[B]")
    _check_devices(fn, token_rewards=token_rewards, grpo_adv=grpo_adv, mask=mask)

    keep = _keep(mask)
    r = torch.where(keep, token_rewards.float(), _zero(token_rewards.float()))
    if normalize:
        n = keep.sum().clamp(min=1).to(r.dtype)
        mean = r.sum() / n
        var = torch.where(keep, (r - mean) ** 2, _zero(r)).sum() / n
        r = (r - mean) / (var.sqrt() + eps)
    adv = (1.0 - mu) * r
    if grpo_adv is not None and mu != 0.0:
        adv = adv + mu * grpo_adv.float()[:, None]
    return torch.where(keep, adv, _zero(adv))


# ---------------------------------------------------------------------------------------------------------------------
# logit level: top-k + tail


def _tail_logp(topk_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_k exp(topk_logp)) over the last dim, stable: log1mexp of the clamped logsumexp.

    log1mexp(x) = log(-expm1(x)) for x > -log 2 and log1p(-exp(x)) below, which avoids cancellation on both
    sides (Maechler 2012). The logsumexp runs in fp64: near mass 1 an fp32 logsumexp is off by ~1e-7 absolute,
    which is a large relative error of 1 - mass; the k values per row make the upcast cheap.
    """
    lse = torch.logsumexp(topk_logp.double(), dim=-1).clamp(max=_TAIL_LOG_MASS_MAX)
    near_one = lse > -math.log(2.0)
    # Evaluate each branch on inputs where it is accurate, so neither produces NaN/inf in the unused lanes.
    hi = torch.log(-torch.expm1(torch.where(near_one, lse, _zero(lse) - 1.0)))
    lo = torch.log1p(-torch.exp(torch.where(near_one, _zero(lse) - 1.0, lse)))
    return torch.where(near_one, hi, lo).to(topk_logp.dtype)


def _check_tail(fn: str, name: str, tail: torch.Tensor | None, shape: torch.Size, shape_desc: str) -> None:
    if tail is not None:
        _check_float_tensor(fn, name, tail)
        _check_same_shape(fn, name, tail, shape, shape_desc)


def _with_tail(topk: torch.Tensor, tail: torch.Tensor | None, add_tail: bool) -> torch.Tensor:
    """fp32 [..., k] -> [..., k+1] log-probs over the buckets (tail appended) or [..., k] renormalised (no tail)."""
    if not add_tail:
        return topk - torch.logsumexp(topk, dim=-1, keepdim=True)
    tail = _tail_logp(topk) if tail is None else tail.float()
    return torch.cat([topk, tail[..., None]], dim=-1)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q) over the last dim, with 0 log 0 = 0 (buckets where p = 0)."""
    live = logp > -math.inf
    # Zero both operands where p = 0 before subtracting, so -inf - -inf never forms a NaN (nor its gradient).
    lp = torch.where(live, logp, _zero(logp))
    lq = torch.where(live, logq, _zero(logq))
    return torch.where(live, lp.exp() * (lp - lq), _zero(lp)).sum(-1)


def _divergence(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-position divergence between bucket log-probs s (student) and t (teacher), TRL's convention."""
    if alpha == 0.0:
        return _kl(t, s)  # forward KL(T || S)
    if alpha == 1.0:
        return _kl(s, t)  # reverse KL(S || T)
    mix = torch.logsumexp(torch.stack([t + math.log(alpha), s + math.log(1.0 - alpha)]), dim=0)
    return alpha * _kl(t, mix) + (1.0 - alpha) * _kl(s, mix)


class TopkDivergence(NamedTuple):
    """Result of ``topk_divergence``."""

    loss: torch.Tensor
    """Scalar fp32: sum_pos m * per_token / max(sum m, 1)."""
    per_token: torch.Tensor
    """[...] fp32 divergence per position, exactly 0 where mask is 0."""


def topk_divergence(
    student_topk_logp: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: float = 0.5,
    student_tail: torch.Tensor | None = None,
    teacher_tail: torch.Tensor | None = None,
    add_tail: bool = True,
) -> TopkDivergence:
    """Divergence between student and teacher over the student's top-k buckets (+ tail), token mean over mask.

    Args:
        student_topk_logp: [..., k] float, log S(v) at the student's top-k ids (full-vocabulary log-probs). Gradients
            flow to it (and to student_tail if given).
        teacher_topk_logp: [..., k] float, log T(v) at the same ids (detached inside: no gradient to the teacher).
        mask: [...] bool or 0/1 numbers over positions (the leading dims of the log-probs).
        alpha: 0 = forward KL(T||S), 1 = reverse KL(S||T), in between generalised JSD_alpha (module docstring).
        student_tail: [...] float or None, the student's tail log-mass log(1 - sum_k S); None computes it stably from
            student_topk_logp.
        teacher_tail: [...] float or None, likewise for the teacher (e.g. ``ContrastiveTeacher.tail_logp``).
        add_tail: append the tail bucket (k + 1 buckets); False renormalises both sides over the k buckets instead,
            and then tails must not be given.

    Returns:
        TopkDivergence(loss scalar fp32, per_token [...] fp32).
    """
    fn = "topk_divergence"
    _check_float_tensor(fn, "student_topk_logp", student_topk_logp)
    _check_float_tensor(fn, "teacher_topk_logp", teacher_topk_logp)
    if student_topk_logp.dim() < 1 or student_topk_logp.shape[-1] == 0:
        raise ValueError(
            f"{fn}: student_topk_logp must have shape [..., k] with k >= 1; got {tuple(student_topk_logp.shape)}"
        )
    _check_same_shape(fn, "teacher_topk_logp", teacher_topk_logp, student_topk_logp.shape, "[..., k]")
    _check_mask(fn, mask, student_topk_logp.shape[:-1], "[...] (the log-probs' leading dims)")
    alpha = _check_real(fn, "alpha", alpha, lo=0.0, hi=1.0)
    if not add_tail and (student_tail is not None or teacher_tail is not None):
        raise ValueError(f"{fn}: student_tail/teacher_tail were given but add_tail=False; drop them or set add_tail")
    _check_devices(
        fn, student_topk_logp=student_topk_logp, teacher_topk_logp=teacher_topk_logp, mask=mask,
        student_tail=student_tail, teacher_tail=teacher_tail,
    )
    _check_tail(fn, "student_tail", student_tail, mask.shape, "[...]")
    _check_tail(fn, "teacher_tail", teacher_tail, mask.shape, "[...]")
    keep = _keep(mask)
    # Masked rows may hold padding garbage (NaN, -inf): replace every input there by the uniform log-prob
    # -log(k + 1) before any math (tail, logsumexp), so neither the values nor the gradients can see it.
    safe = torch.full((), -math.log(student_topk_logp.shape[-1] + 1), dtype=torch.float32, device=mask.device)

    def clean(x: torch.Tensor | None, row_mask: torch.Tensor) -> torch.Tensor | None:
        return None if x is None else torch.where(row_mask, x.float(), safe)

    s = _with_tail(clean(student_topk_logp, keep[..., None]), clean(student_tail, keep), add_tail)
    t_tail = None if teacher_tail is None else teacher_tail.detach()
    t = _with_tail(clean(teacher_topk_logp.detach(), keep[..., None]), clean(t_tail, keep), add_tail)
    fill = torch.zeros((), dtype=torch.float32, device=s.device)
    per_token = torch.where(keep, _divergence(s, t, alpha), fill)
    return TopkDivergence(_masked_token_mean(per_token, keep), per_token)


class ContrastiveTeacher(NamedTuple):
    """Result of ``contrastive_teacher_topk``: log T~ over the buckets, logsumexp over topk (+ tail) = 0."""

    topk_logp: torch.Tensor
    """[..., k] fp32 log T~ at the top-k ids."""
    tail_logp: torch.Tensor | None
    """[...] fp32 log T~ of the tail bucket; None when add_tail=False (then topk_logp alone sums to 1)."""


def contrastive_teacher_topk(
    teacher_topk_logp: torch.Tensor,
    shuffled_topk_logp: torch.Tensor,
    student_topk_logp: torch.Tensor,
    *,
    lam: float = 0.5,
    baseline: str = "mean",
    teacher_tail: torch.Tensor | None = None,
    shuffled_tail: torch.Tensor | None = None,
    student_tail: torch.Tensor | None = None,
    add_tail: bool = True,
) -> ContrastiveTeacher:
    """CREDIT's contrastive teacher at logit level: log T~ = log T + lam * (s - beta), renormalised over buckets.

    Every side is first put on the same buckets (top-k + its tail log(1 - sum_k p), or top-k renormalised when
    add_tail=False), then log T~ = t + lam * (s - beta) - logsumexp(...). lam = 0 returns the teacher's buckets
    (renormalised). All inputs are detached: the result is a target.

    Args:
        teacher_topk_logp: [..., k] float, aligned teacher log T(v | c(x, f)) at the student's top-k ids.
        shuffled_topk_logp: [M, ..., k] float, M >= 1, shuffled teachers log T(v | c(x_m, f)) at the same ids.
        student_topk_logp: [..., k] float, student log S(v) at the same ids.
        lam: debiasing weight in [0, 1]; outside raises ValueError (as credit_rewards).
        baseline: "mean" or "logmeanexp" over M, per bucket.
        teacher_tail, student_tail: [...] float or None; shuffled_tail: [M, ...] float or None. Tail log-masses; None
            computes them from the top-k log-probs.
        add_tail: as in topk_divergence.

    Returns:
        ContrastiveTeacher(topk_logp [..., k] fp32, tail_logp [...] fp32 or None). Feed it to
        ``topk_divergence(student_topk_logp, ct.topk_logp, mask, teacher_tail=ct.tail_logp, add_tail=add_tail)``.
    """
    fn = "contrastive_teacher_topk"
    lam = _check_lam(fn, lam)
    _check_baseline(fn, baseline)
    _check_float_tensor(fn, "teacher_topk_logp", teacher_topk_logp)
    _check_float_tensor(fn, "shuffled_topk_logp", shuffled_topk_logp)
    _check_float_tensor(fn, "student_topk_logp", student_topk_logp)
    shape = teacher_topk_logp.shape
    if teacher_topk_logp.dim() < 1 or shape[-1] == 0:
        raise ValueError(f"{fn}: teacher_topk_logp must have shape [..., k] with k >= 1; got {tuple(shape)}")
    _check_same_shape(fn, "student_topk_logp", student_topk_logp, shape, "[..., k]")
    if shuffled_topk_logp.dim() != len(shape) + 1 or shuffled_topk_logp.shape[1:] != shape:
        raise ValueError(
            f"{fn}: shuffled_topk_logp must have shape [M, ..., k] = [M, {', '.join(map(str, shape))}]; "
            f"got {tuple(shuffled_topk_logp.shape)}"
        )
    if shuffled_topk_logp.shape[0] == 0:
        raise ValueError(f"{fn}: shuffled_topk_logp has M = 0 partners; CREDIT needs M >= 1 (lam=0 is SDPO)")
    if not add_tail and any(x is not None for x in (teacher_tail, shuffled_tail, student_tail)):
        raise ValueError(f"{fn}: tails were given but add_tail=False; drop them or set add_tail")
    if shuffled_tail is not None:
        _check_float_tensor(fn, "shuffled_tail", shuffled_tail)
        _check_same_shape(fn, "shuffled_tail", shuffled_tail, shuffled_topk_logp.shape[:-1], "[M, ...]")
    _check_devices(
        fn, teacher_topk_logp=teacher_topk_logp, shuffled_topk_logp=shuffled_topk_logp,
        student_topk_logp=student_topk_logp, teacher_tail=teacher_tail, shuffled_tail=shuffled_tail,
        student_tail=student_tail,
    )

    _check_tail(fn, "teacher_tail", teacher_tail, shape[:-1], "[...]")
    _check_tail(fn, "student_tail", student_tail, shape[:-1], "[...]")

    def buckets(topk, tail):
        return _with_tail(topk.detach().float(), None if tail is None else tail.detach(), add_tail)

    t = buckets(teacher_topk_logp, teacher_tail)
    s = buckets(student_topk_logp, student_tail)
    b = buckets(shuffled_topk_logp, shuffled_tail)
    logits = t + lam * (s - _baseline(b, baseline)) if lam != 0.0 else t
    out = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    if not add_tail:
        return ContrastiveTeacher(out, None)
    return ContrastiveTeacher(out[..., :-1], out[..., -1])
