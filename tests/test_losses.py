"""credit.losses: values and gradients vs straightforward fp64 references, hand-computed cases, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from credit import (
    contrastive_teacher_topk,
    credit_rewards,
    grpo_advantages,
    mix_advantages,
    policy_gradient_loss,
    topk_divergence,
)
from credit.losses import _tail_logp
from tests.utils import assert_close_verbose

LN2 = 0.6931471805599453

# ----------------------------------------------------------------------------------------------------------------------
# policy gradient


def _pg_ref(s, adv, mask, old, is_clip):
    """Straightforward fp64: - sum m w A s / sum m."""
    m = mask.double()
    w = torch.ones_like(s) if old is None else torch.exp(s.detach() - old)
    if old is not None and is_clip is not None:
        w = w.clamp(max=is_clip)
    return -(m * w * adv * s).sum() / m.sum()


@pytest.mark.parametrize("b, t", [(1, 1), (3, 17), (4, 65)])
@pytest.mark.parametrize("off_policy, is_clip", [(False, 2.0), (True, 2.0), (True, None), (True, 1.2)])
def test_policy_gradient_loss_value_and_grad(b, t, off_policy, is_clip):
    s64 = (-5 * torch.rand(b, t, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(b, t, dtype=torch.float64)
    old = (s64.detach() + 1.5 * torch.randn(b, t, dtype=torch.float64)) if off_policy else None  # ratios up to e^4
    mask = torch.rand(b, t) < 0.7
    mask[0, 0] = True
    ref = _pg_ref(s64, adv, mask, old, is_clip)
    (g_ref,) = torch.autograd.grad(ref, s64)

    s32 = s64.detach().float().requires_grad_()
    adv32 = adv.float().requires_grad_()
    loss = policy_gradient_loss(s32, adv32, mask, old_logp=None if old is None else old.float(), is_clip=is_clip)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert_close_verbose(loss, ref, atol=1e-5, rtol=1e-5, name="loss")
    g, g_adv = torch.autograd.grad(loss, (s32, adv32), allow_unused=True)
    assert_close_verbose(g, g_ref, atol=1e-6, rtol=1e-5, name="d loss / d s")
    assert g_adv is None or (g_adv == 0).all(), "advantages are stop-gradient"


def test_policy_gradient_loss_masked_garbage_and_empty_mask():
    s = torch.randn(2, 5).requires_grad_()
    adv = torch.randn(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 2:] = False
    poisoned = torch.where(mask, s, torch.tensor(-math.inf))
    old = torch.where(mask, s.detach(), torch.tensor(math.nan))
    loss = policy_gradient_loss(poisoned, adv, mask, old_logp=old)
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and (g[~mask] == 0).all()
    clean = policy_gradient_loss(s, adv, mask)
    assert_close_verbose(loss, clean, atol=1e-6, name="poisoned vs clean")
    # All masked: zero loss, zero gradient (no 0/0).
    loss = policy_gradient_loss(s, adv, torch.zeros(2, 5))
    (g,) = torch.autograd.grad(loss, s)
    assert loss.item() == 0.0 and (g == 0).all()


def test_policy_gradient_loss_bf16_input_grads_in_input_dtype():
    s = (-3 * torch.rand(3, 9)).bfloat16().requires_grad_()
    adv = torch.randn(3, 9)
    mask = torch.ones(3, 9)
    loss = policy_gradient_loss(s, adv, mask)
    (g,) = torch.autograd.grad(loss, s)
    assert loss.dtype == torch.float32 and g.dtype == torch.bfloat16
    assert_close_verbose(g.float(), -adv / 27, atol=1e-3, rtol=1e-2, name="bf16 grad")


# ----------------------------------------------------------------------------------------------------------------------
# advantages


def test_grpo_advantages_vs_loop():
    gids = [7, -3, 7, 7, 100, -3, 100, 5]  # unequal sizes, any ids, interleaved; group 5 has one response
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 1.0, 0.5, 0.3], dtype=torch.float64)
    out = grpo_advantages(r.float(), gids)
    exp = torch.zeros(len(gids), dtype=torch.float64)
    for g in set(gids):
        idx = [i for i, x in enumerate(gids) if x == g]
        rg = r[idx]
        std = rg.std() if len(idx) > 1 else torch.tensor(0.0, dtype=torch.float64)  # unbiased, as TRL
        exp[idx] = (rg - rg.mean()) / (std + 1e-6)
    assert out.dtype == torch.float32
    assert_close_verbose(out, exp, atol=1e-5, rtol=1e-5, name="grpo")
    assert out[7] == 0 and out[4] == 0 and out[6] == 0, "single responses and constant groups get 0"
    centred = grpo_advantages(r.float(), torch.tensor(gids), normalize_std=False)
    exp_c = torch.stack([r[i] - r[[j for j, x in enumerate(gids) if x == g]].mean() for i, g in enumerate(gids)])
    assert_close_verbose(centred, exp_c, atol=1e-6, name="mean-centred")


def test_mix_advantages():
    r = torch.randn(3, 6, dtype=torch.float64)
    a_grpo = torch.randn(3, dtype=torch.float64)
    mask = torch.rand(3, 6) < 0.6
    mask[0, 0] = True
    r_p = torch.where(mask, r, torch.tensor(math.nan, dtype=torch.float64))
    out0 = mix_advantages(r_p.float(), None, mask)
    assert_close_verbose(out0, torch.where(mask, r, 0.0), atol=1e-6, name="mu=0")
    out1 = mix_advantages(r_p.float(), a_grpo.float(), mask, mu=1.0)
    assert_close_verbose(out1, torch.where(mask, a_grpo[:, None].expand(3, 6), 0.0), atol=1e-6, name="mu=1")
    out = mix_advantages(r_p.float(), a_grpo.float(), mask, mu=0.3)
    assert_close_verbose(out, torch.where(mask, 0.3 * a_grpo[:, None] + 0.7 * r, 0.0), atol=1e-6, name="mu=0.3")
    # Normalisation over the masked tokens: zero mean, unit (population) std there; exact 0 elsewhere.
    norm = mix_advantages(r_p.float(), None, mask, normalize=True)
    vals = norm[mask].double()
    assert abs(vals.mean().item()) < 1e-5 and abs(vals.std(unbiased=False).item() - 1) < 1e-4
    assert (norm[~mask] == 0).all()


# ----------------------------------------------------------------------------------------------------------------------
# top-k divergence: hand-computed cases


def _lp(*p):
    return torch.tensor([list(p)], dtype=torch.float32).log()


# Student top-2 mass [1/2, 1/4] (tail 1/4), teacher at the same ids [1/4, 1/2] (tail 1/4).
#   reverse KL(S||T) = 1/2 ln 2 + 1/4 ln(1/2) + 0 = ln2 / 4
#   forward KL(T||S) = 1/4 ln(1/2) + 1/2 ln 2 + 0 = ln2 / 4
#   JSD_0.5: Mix = [3/8, 3/8, 1/4]; KL(T||Mix) = KL(S||Mix) = 1/4 ln(2/3) + 1/2 ln(4/3); JSD = that value.
HAND = [(1.0, LN2 / 4), (0.0, LN2 / 4), (0.5, 0.25 * math.log(2 / 3) + 0.5 * math.log(4 / 3))]


@pytest.mark.parametrize("alpha, expected", HAND)
def test_topk_divergence_hand_computed(alpha, expected):
    s, t = _lp(0.5, 0.25), _lp(0.25, 0.5)
    out = topk_divergence(s, t, torch.ones(1), alpha=alpha)
    assert out.per_token.shape == (1,)
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-5)
    assert math.isclose(out.per_token.item(), expected, rel_tol=1e-5)


def test_jsd_weights_follow_trl_convention():
    # Asymmetric case where the weights matter: JSD_a = a KL(T||M) + (1-a) KL(S||M), M = a T + (1-a) S.
    p_s, p_t, a = [0.7, 0.2, 0.1], [0.1, 0.3, 0.6], 0.2
    mix = [a * t + (1 - a) * s for s, t in zip(p_s, p_t)]
    kl = lambda p, q: sum(x * math.log(x / y) for x, y in zip(p, q))  # noqa: E731
    expected = a * kl(p_t, mix) + (1 - a) * kl(p_s, mix)
    out = topk_divergence(_lp(*p_s), _lp(*p_t), torch.ones(1), alpha=a, add_tail=False)
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-5)


def test_logit_level_loss_at_lam0_is_sdpo_hand_computed():
    # CREDIT's contrastive teacher with lam = 0 is SDPO's teacher: same hand-computed reverse KL (ln2 / 4).
    s, t = _lp(0.5, 0.25), _lp(0.25, 0.5)
    shuffled = torch.stack([_lp(0.1, 0.1), _lp(0.6, 0.3)])  # must not matter at lam = 0
    ct = contrastive_teacher_topk(t, shuffled, s, lam=0.0)
    assert_close_verbose(ct.topk_logp.exp(), torch.tensor([[0.25, 0.5]]), atol=1e-6, name="T~ at lam=0")
    assert_close_verbose(ct.tail_logp.exp(), torch.tensor([0.25]), atol=1e-6, name="T~ tail at lam=0")
    out = topk_divergence(s, ct.topk_logp, torch.ones(1), alpha=1.0, teacher_tail=ct.tail_logp)
    assert math.isclose(out.loss.item(), LN2 / 4, rel_tol=1e-5)


def test_contrastive_teacher_hand_computed():
    # lam = 1 and the shuffled teacher equal to the aligned one (feedback that helps whatever the input):
    # T~ ∝ T * S / T = S, so there is no input-specific credit and the loss is 0.
    s, t = _lp(0.5, 0.25), _lp(0.25, 0.5)
    ct = contrastive_teacher_topk(t, t[None], s, lam=1.0)
    assert_close_verbose(ct.topk_logp, s, atol=1e-6, name="T~ = S")
    assert topk_divergence(s, ct.topk_logp, torch.ones(1), alpha=0.5, teacher_tail=ct.tail_logp).loss.abs() < 1e-7
    # lam = 1/2, M = 1, buckets S = [1/2, 1/4, 1/4], T = [1/4, 1/2, 1/4], B = [1/4, 1/4, 1/2]:
    # T~ ∝ T * sqrt(S / B) = [sqrt2 / 4, 1/2, sqrt2 / 8] -> normalise by Z = 1/2 + 3 sqrt2 / 8.
    ct = contrastive_teacher_topk(t, _lp(0.25, 0.25)[None], s, lam=0.5)
    z = 0.5 + 3 * math.sqrt(2) / 8
    expected = torch.tensor([[math.sqrt(2) / 4, 0.5]]) / z
    assert_close_verbose(ct.topk_logp.exp(), expected, atol=1e-6, name="T~ lam=0.5")
    assert math.isclose(ct.tail_logp.exp().item(), math.sqrt(0.5) / 4 / z, rel_tol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# top-k divergence vs a full-vocabulary fp64 reference


def _bucket_ref(topk_logp64, add_tail):
    """fp64 buckets as probabilities: [..., k(+1)]."""
    p = topk_logp64.exp()
    if add_tail:
        return torch.cat([p, (1 - p.sum(-1, keepdim=True))], -1)
    return p / p.sum(-1, keepdim=True)


def _div_ref(ps, pt, alpha):
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)  # noqa: E731
    if alpha == 0:
        return kl(pt, ps)
    if alpha == 1:
        return kl(ps, pt)
    mix = alpha * pt + (1 - alpha) * ps
    return alpha * kl(pt, mix) + (1 - alpha) * kl(ps, mix)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("b, t, v, k", [(1, 1, 5, 1), (3, 5, 50, 7), (2, 9, 37, 20)])
def test_topk_divergence_vs_fp64_reference(alpha, add_tail, b, t, v, k):
    logits64 = (2 * torch.randn(b, t, v, dtype=torch.float64)).requires_grad_()
    t_logits = 2 * torch.randn(b, t, v, dtype=torch.float64)
    mask = torch.rand(b, t) < 0.7
    mask[0, 0] = True
    upstream = torch.randn(b, t, dtype=torch.float64)

    s_full = logits64.log_softmax(-1)
    ids = s_full.topk(k, dim=-1).indices
    t_top = t_logits.log_softmax(-1).gather(-1, ids)
    ref = torch.where(mask, _div_ref(_bucket_ref(s_full.gather(-1, ids), add_tail), _bucket_ref(t_top, add_tail),
                                     alpha), 0.0)
    (g_ref,) = torch.autograd.grad((ref * upstream).sum(), logits64)

    logits32 = logits64.detach().float().requires_grad_()
    s_top32 = logits32.log_softmax(-1).gather(-1, ids)
    t_top32 = t_top.float().requires_grad_()
    out = topk_divergence(s_top32, t_top32, mask, alpha=alpha, add_tail=add_tail)
    assert out.per_token.shape == (b, t) and out.per_token.dtype == torch.float32
    assert_close_verbose(out.per_token, ref, atol=2e-5, rtol=1e-4, name="per_token")
    assert_close_verbose(out.loss, ref.sum() / mask.sum(), atol=2e-5, rtol=1e-4, name="loss")
    assert (out.per_token[~mask] == 0).all()
    assert (out.per_token >= -1e-6).all(), "a divergence is non-negative"
    g, g_t = torch.autograd.grad((out.per_token * upstream.float()).sum(), (logits32, t_top32), allow_unused=True)
    assert_close_verbose(g, g_ref, atol=2e-5, rtol=1e-4, name="d / d student logits")
    assert g_t is None or (g_t == 0).all(), "no gradient may reach the teacher"


def test_topk_divergence_identical_distributions_and_masked_garbage():
    s = torch.randn(4, 6, 11).log_softmax(-1)[..., :5]
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2] = False
    for alpha in (0.0, 0.5, 1.0):
        assert topk_divergence(s, s, mask, alpha=alpha).per_token.abs().max() < 1e-6
    s_bad = torch.where(mask[..., None], s, torch.tensor(math.nan)).requires_grad_()
    t_bad = torch.where(mask[..., None], s.flip(-1), torch.tensor(-math.inf))
    out = topk_divergence(s_bad, t_bad, mask, alpha=0.5)
    (g,) = torch.autograd.grad(out.loss, s_bad)
    assert torch.isfinite(out.loss) and torch.isfinite(g).all() and (g[2] == 0).all()


def test_tail_is_stable_when_topk_holds_almost_all_mass():
    # One dominant logit: the top-k mass is 1 - 1e-12 in fp64, i.e. exactly 1 in fp32. The tail must stay finite.
    logits = torch.tensor([[40.0, 10.0, 0.0, -5.0, -9.0]]).requires_grad_()
    s = logits.log_softmax(-1)[..., :2]
    t = torch.tensor([[30.0, 12.0, 1.0, 0.0, 0.0]]).log_softmax(-1)[..., :2]
    out = topk_divergence(s, t, torch.ones(1), alpha=0.5)
    (g,) = torch.autograd.grad(out.loss, logits)
    assert torch.isfinite(out.loss) and torch.isfinite(g).all()
    # The tail helper vs fp64 log(1 - mass) across masses from 1e-7 to 1 - 1e-6 (both log1mexp branches).
    mass = torch.tensor([1e-7, 1e-3, 0.3, 0.5, 0.69, 0.9, 0.999, 1 - 1e-6], dtype=torch.float64)
    parts = torch.stack([mass * 0.25, mass * 0.75], -1)  # two buckets holding the mass
    parts32 = parts.log().float()
    got = _tail_logp(parts32)
    # Near mass 1 the fp32 log-probs themselves fix the tail only to ~1e-7 / (1 - mass): compare against fp64 math
    # on the same fp32 inputs, which checks that the helper adds no cancellation of its own.
    exp = torch.log(-torch.expm1(torch.logsumexp(parts32.double(), -1)))
    assert_close_verbose(got, exp, atol=1e-6, rtol=1e-5, name="tail")
    assert_close_verbose(got[:-1], torch.log1p(-mass[:-1]), atol=1e-6, rtol=2e-3, name="tail vs true mass")
    # A caller-provided tail is used as is.
    tail = _tail_logp(s)
    a = topk_divergence(s, t, torch.ones(1), student_tail=tail, teacher_tail=_tail_logp(t))
    b = topk_divergence(s, t, torch.ones(1))
    assert_close_verbose(a.loss, b.loss, atol=1e-7, name="given tails")


# ----------------------------------------------------------------------------------------------------------------------
# contrastive teacher vs fp64 formula, and its link to the token reward


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("baseline", ["mean", "logmeanexp"])
@pytest.mark.parametrize("add_tail", [True, False])
def test_contrastive_teacher_vs_fp64(lam, baseline, add_tail):
    n, m, v, k = 7, 3, 40, 6
    s_full = torch.randn(n, v, dtype=torch.float64).log_softmax(-1)
    ids = s_full.topk(k, -1).indices
    t = torch.randn(n, v, dtype=torch.float64).log_softmax(-1).gather(-1, ids)
    b = torch.randn(m, n, v, dtype=torch.float64).log_softmax(-1).gather(-1, ids.expand(m, n, k))
    s = s_full.gather(-1, ids)
    lb = lambda x: _bucket_ref(x, add_tail).log()  # noqa: E731
    beta = lb(b).mean(0) if baseline == "mean" else torch.logsumexp(lb(b), 0) - math.log(m)
    logits = lb(t) + lam * (lb(s) - beta)
    ref = logits - torch.logsumexp(logits, -1, keepdim=True)

    s32 = s.float().requires_grad_()
    ct = contrastive_teacher_topk(t.float(), b.float(), s32, lam=lam, baseline=baseline, add_tail=add_tail)
    got = ct.topk_logp if not add_tail else torch.cat([ct.topk_logp, ct.tail_logp[..., None]], -1)
    assert ct.tail_logp is None or ct.tail_logp.shape == (n,)
    assert_close_verbose(got, ref, atol=2e-5, rtol=1e-5, name="log T~")
    assert_close_verbose(torch.logsumexp(got, -1), torch.zeros(n), atol=1e-5, name="normalised")
    assert not got.requires_grad, "the contrastive teacher is a target: student terms are detached"


def test_sampled_token_value_recovers_credit_reward():
    # log T~(y) - s(y) = a - s - lam (beta - s) - log Z: the CREDIT token reward up to the normaliser.
    # Distributions over exactly k ids (no tail), so the bucket renormalisation is the identity.
    n, m, k, lam = 5, 2, 4, 0.4
    s = torch.randn(n, k).log_softmax(-1)
    t = torch.randn(n, k).log_softmax(-1)
    b = torch.randn(m, n, k).log_softmax(-1)
    ct = contrastive_teacher_topk(t, b, s, lam=lam, add_tail=False)
    log_z = torch.logsumexp(t + lam * (s - b.mean(0)), -1)
    y = 1  # the sampled token is id 1 in every row
    r = credit_rewards(t[None, :, y], b[:, None, :, y], s[None, :, y], torch.ones(1, n), lam=lam)[0]
    assert_close_verbose(ct.topk_logp[:, y] - s[:, y] + log_z, r, atol=1e-5, name="sampled-token reward")


# ----------------------------------------------------------------------------------------------------------------------
# bad input


def test_loss_bad_input():
    s, adv, mask = torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"policy_gradient_loss: advantages must have shape \[B, T\] = \(2, 3\); got"):
        policy_gradient_loss(s, adv[:, :2], mask)
    with pytest.raises(ValueError, match=r"old_logp must have shape"):
        policy_gradient_loss(s, adv, mask, old_logp=torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"is_clip must be > 0.0; got 0.0"):
        policy_gradient_loss(s, adv, mask, is_clip=0.0)
    with pytest.raises(ValueError, match=r"grpo_advantages: group_ids must have shape \[B\] = \[3\]; got \(2,\)"):
        grpo_advantages(torch.zeros(3), [0, 1])
    with pytest.raises(ValueError, match=r"mix_advantages: mu must be >= 0.0 and <= 1.0; got 1.5"):
        mix_advantages(adv, torch.zeros(2), mask, mu=1.5)
    with pytest.raises(ValueError, match=r"grpo_adv is None but mu = 0.5"):
        mix_advantages(adv, None, mask, mu=0.5)
    with pytest.raises(ValueError, match=r"grpo_adv must have shape \[B\] = \(2,\); got \(3,\)"):
        mix_advantages(adv, torch.zeros(3), mask, mu=0.5)


def test_topk_bad_input():
    s, t, mask = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"teacher_topk_logp must have shape \[\.\.\., k\] = \(2, 3, 4\); got"):
        topk_divergence(s, torch.randn(2, 3, 5), mask)
    with pytest.raises(ValueError, match=r"mask must have shape \[\.\.\.\] \(the log-probs' leading dims\) = \(2, 3\)"):
        topk_divergence(s, t, torch.ones(2))
    with pytest.raises(ValueError, match=r"alpha must be >= 0.0 and <= 1.0; got 1.2"):
        topk_divergence(s, t, mask, alpha=1.2)
    with pytest.raises(ValueError, match=r"tails were given but add_tail=False|student_tail/teacher_tail were given"):
        topk_divergence(s, t, mask, add_tail=False, teacher_tail=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"student_tail must have shape \[\.\.\.\] = \(2, 3\); got \(3,\)"):
        topk_divergence(s, t, mask, student_tail=torch.zeros(3))
    with pytest.raises(ValueError, match=r"shuffled_topk_logp has M = 0 partners"):
        contrastive_teacher_topk(t, t[None][:0], s)
    with pytest.raises(ValueError, match=r"shuffled_topk_logp must have shape \[M, \.\.\., k\] = \[M, 2, 3, 4\]"):
        contrastive_teacher_topk(t, t, s)
    with pytest.raises(ValueError, match=r"contrastive_teacher_topk: lam must be in \[0, 1\]"):
        contrastive_teacher_topk(t, t[None], s, lam=-0.5)
    with pytest.raises(ValueError, match=r"baseline must be one of"):
        contrastive_teacher_topk(t, t[None], s, baseline="median")
