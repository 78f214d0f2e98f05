"""credit.sdpo_rewards / credit_rewards / sequence_pmi against fp64 references, identities and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from credit import credit_rewards, sdpo_rewards, sequence_pmi
from tests.utils import HAS_CUDA, assert_close_verbose

SHAPES = [(1, 1, 1), (3, 7, 2), (5, 33, 3), (2, 129, 4)]  # (B, T, M), odd sizes


def _inputs(b, t, m, dtype=torch.float32, p_mask=0.7):
    """Log-prob-like values in [-12, 0], a random mask with NaN/inf planted at masked positions."""
    a = -12 * torch.rand(b, t, dtype=torch.float64)
    sh = -12 * torch.rand(m, b, t, dtype=torch.float64)
    s = -12 * torch.rand(b, t, dtype=torch.float64)
    mask = torch.rand(b, t) < p_mask
    mask[0, 0] = True
    return a.to(dtype), sh.to(dtype), s.to(dtype), mask


def _poison(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fill masked positions with NaN / +inf / -inf: outputs there must still be exactly 0."""
    junk = torch.tensor([math.nan, math.inf, -math.inf], dtype=x.dtype)[torch.arange(mask.numel()) % 3]
    return torch.where(mask, x, junk.view(mask.shape))


def _ref_rewards(a, sh, s, mask, lam, baseline):
    a, sh, s = a.double(), sh.double(), s.double()
    beta = sh.mean(0) if baseline == "mean" else torch.logsumexp(sh, 0) - math.log(sh.shape[0])
    return torch.where(mask, a - s - lam * (beta - s), 0.0)


@pytest.mark.parametrize("b, t, m", SHAPES)
@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("baseline", ["mean", "logmeanexp"])
def test_credit_rewards_vs_fp64(b, t, m, lam, baseline):
    a, sh, s, mask = _inputs(b, t, m)
    out = credit_rewards(_poison(a, mask), _poison(sh, mask.expand(m, b, t)), _poison(s, mask), mask, lam=lam,
                         baseline=baseline)
    assert out.dtype == torch.float32 and out.shape == (b, t)
    assert_close_verbose(out, _ref_rewards(a, sh, s, mask, lam, baseline), atol=1e-5, rtol=1e-6, name="r_cr")
    assert (out[~mask] == 0).all() and not torch.signbit(out[~mask]).any(), "masked rewards must be exactly +0.0"


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 1e-5), (torch.float16, 1e-5), (torch.float64, 1e-5)])
def test_credit_rewards_low_precision_inputs_compute_in_fp32(dtype, atol):
    a, sh, s, mask = _inputs(4, 17, 2, dtype=dtype)
    out = credit_rewards(a, sh, s, mask, lam=0.5)
    assert out.dtype == torch.float32
    # The reference sees exactly the values the function sees (the low-precision inputs, upcast).
    assert_close_verbose(out, _ref_rewards(a, sh, s, mask, 0.5, "mean"), atol=atol, name="r_cr")


@pytest.mark.parametrize("b, t, m", SHAPES)
def test_identities(b, t, m):
    a, sh, s, mask = _inputs(b, t, m)
    sd = sdpo_rewards(a, s, mask)
    # lam = 0 is SDPO (bit-identical: (a - s) - 0 * (beta - s)).
    for baseline in ("mean", "logmeanexp"):
        assert torch.equal(credit_rewards(a, sh, s, mask, lam=0.0, baseline=baseline), sd)
    # lam = 1 is the pure contrast a - mean_m b.
    contrast = torch.where(mask, a - sh.mean(0), 0.0)
    assert_close_verbose(credit_rewards(a, sh, s, mask, lam=1.0), contrast, atol=1e-5, name="lam=1")
    # With M = 1 both baselines are b itself.
    one = sh[:1]
    assert_close_verbose(
        credit_rewards(a, one, s, mask, lam=0.7, baseline="logmeanexp"),
        credit_rewards(a, one, s, mask, lam=0.7, baseline="mean"), atol=1e-6, name="M=1",
    )
    # Teacher = student: zero SDPO reward everywhere, exactly.
    assert torch.equal(sdpo_rewards(s, s, mask), torch.zeros(b, t))
    # Interpolation: r_cr = (1 - lam) r_sd + lam (a - beta).
    assert_close_verbose(credit_rewards(a, sh, s, mask, lam=0.3), 0.7 * sd + 0.3 * contrast, atol=1e-5,
                         name="interpolation")


def test_logmeanexp_baseline_dominates_mean():
    # Jensen: logmeanexp_m b >= mean_m b, so for lam > 0 the logmeanexp rewards are never larger.
    a, sh, s, mask = _inputs(6, 40, 4)
    r_mean = credit_rewards(a, sh, s, mask, lam=0.5, baseline="mean")
    r_lme = credit_rewards(a, sh, s, mask, lam=0.5, baseline="logmeanexp")
    assert (r_lme <= r_mean + 1e-6).all()


def test_sdpo_rewards_mask_dtypes_and_poison():
    a, _, s, mask = _inputs(3, 11, 1)
    ref = torch.where(mask, a.double() - s.double(), 0.0)
    for m in (mask, mask.long(), mask.float(), mask.to(torch.uint8)):
        out = sdpo_rewards(_poison(a, mask), _poison(s, mask), m)
        assert out.dtype == torch.float32
        assert_close_verbose(out, ref, atol=1e-6, name=f"r_sd mask {m.dtype}")
        assert (out[~mask] == 0).all()


def _ref_pmi(a, sh, s, mask):
    a, sh, s = (torch.where(mask, x.double(), 0.0) for x in (a, sh, s))
    big_a, big_b = a.sum(-1), sh.sum(-1)
    pmi = (a - s).sum(-1)
    top = big_b.max(0).values  # log mean_m exp B_m, shifted by hand
    contrastive = big_a - (top + torch.log(torch.exp(big_b - top).mean(0)))
    surrogate = (a - sh.mean(0)).sum(-1)
    return pmi, contrastive, surrogate


@pytest.mark.parametrize("b, t, m", SHAPES)
def test_sequence_pmi_vs_fp64(b, t, m):
    a, sh, s, mask = _inputs(b, t, m)
    out = sequence_pmi(_poison(a, mask), _poison(sh, mask.expand(m, b, t)), _poison(s, mask), mask)
    ref = _ref_pmi(a, sh, s, mask)
    for name, got, exp in zip(("pmi", "contrastive_pmi", "contrastive_pmi_surrogate"), out, ref):
        assert got.dtype == torch.float32 and got.shape == (b,)
        # Sums of up to 129 terms of size ~12 in fp32.
        assert_close_verbose(got, exp, atol=2e-4, rtol=1e-5, name=name)
    # Jensen: the surrogate bounds the contrastive pMI from above; with M = 1 they coincide.
    assert (out.contrastive_pmi_surrogate >= out.contrastive_pmi - 1e-4).all()
    # pMI is the sum of the SDPO rewards, the surrogate the sum of the lam = 1 CREDIT rewards.
    assert_close_verbose(out.pmi, sdpo_rewards(a, s, mask).double().sum(-1), atol=1e-4, name="pmi=sum r_sd")
    assert_close_verbose(out.contrastive_pmi_surrogate, credit_rewards(a, sh, s, mask, lam=1.0).double().sum(-1),
                         atol=1e-4, name="surrogate=sum r_cr(lam=1)")


def test_sequence_pmi_single_partner_and_empty_rows_and_long_sequences():
    a, sh, s, mask = _inputs(3, 9, 1)
    mask[1] = False  # a response with no teacher signal
    out = sequence_pmi(a, sh, s, mask)
    assert_close_verbose(out.contrastive_pmi, out.contrastive_pmi_surrogate, atol=1e-5, name="M=1")
    assert out.pmi[1] == 0 and out.contrastive_pmi[1] == 0 and out.contrastive_pmi_surrogate[1] == 0
    # Sequence log-probs of -1e4 and below: logmeanexp over M must not underflow to -inf.
    a, sh, s, mask = _inputs(2, 2000, 3)
    mask[:] = True
    out = sequence_pmi(a * 2, sh * 2, s, mask)
    assert torch.isfinite(out.contrastive_pmi).all()
    assert_close_verbose(out.contrastive_pmi, _ref_pmi(a * 2, sh * 2, s, mask)[1], atol=0.05, rtol=1e-5,
                         name="long contrastive")


# ----------------------------------------------------------------------------------------------------------------------
# bad input


def test_nan_at_unmasked_position_names_the_argument():
    a, sh, s, mask = _inputs(2, 5, 2)
    mask[1, 3] = True
    for name in ("aligned", "shuffled", "student"):
        args = {"aligned": a.clone(), "shuffled": sh.clone(), "student": s.clone()}
        bad = args[name]
        bad[..., 1, 3] = math.nan if name != "student" else -math.inf
        with pytest.raises(ValueError, match=rf"credit_rewards: {name} has \d+ non-finite .*check_inputs=False"):
            credit_rewards(args["aligned"], args["shuffled"], args["student"], mask)
        with pytest.raises(ValueError, match=rf"sequence_pmi: {name} has"):
            sequence_pmi(args["aligned"], args["shuffled"], args["student"], mask)
        # The opt-out skips the scan (the NaN then reaches the output, as documented).
        out = credit_rewards(args["aligned"], args["shuffled"], args["student"], mask, check_inputs=False)
        assert not torch.isfinite(out[1, 3])
    bad = a.clone()
    bad[1, 3] = math.inf
    with pytest.raises(ValueError, match=r"sdpo_rewards: aligned has 1 non-finite .* first at index \[1, 3\]"):
        sdpo_rewards(bad, s, mask)


@pytest.mark.parametrize("lam", [-0.1, 1.5, math.nan, math.inf])
def test_lam_outside_unit_interval_raises(lam):
    a, sh, s, mask = _inputs(2, 3, 1)
    with pytest.raises(ValueError, match=r"credit_rewards: lam must be in \[0, 1\].*got"):
        credit_rewards(a, sh, s, mask, lam=lam)


def test_bad_options_and_types():
    a, sh, s, mask = _inputs(2, 3, 2)
    with pytest.raises(TypeError, match=r"lam must be a real number in \[0, 1\]; got bool"):
        credit_rewards(a, sh, s, mask, lam=True)
    with pytest.raises(TypeError, match=r"lam must be a real number.*got Tensor"):
        credit_rewards(a, sh, s, mask, lam=torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"baseline must be one of \('mean', 'logmeanexp'\); got 'max'"):
        credit_rewards(a, sh, s, mask, baseline="max")
    with pytest.raises(TypeError, match=r"credit_rewards: aligned must be a floating-point.*got dtype torch.int64"):
        credit_rewards(a.long(), sh, s, mask)
    with pytest.raises(TypeError, match=r"student must be a torch.Tensor; got list"):
        sdpo_rewards(a, s.tolist(), mask)
    with pytest.raises(TypeError, match=r"mask must be a torch.Tensor"):
        sdpo_rewards(a, s, None)


def test_shapes_that_disagree():
    a, sh, s, mask = _inputs(2, 3, 2)
    with pytest.raises(ValueError, match=r"student must have shape \[B, T\] = \(2, 3\); got \(2, 4\)"):
        credit_rewards(a, sh, torch.zeros(2, 4), mask)
    with pytest.raises(ValueError, match=r"mask must have shape \[B, T\] = \(2, 3\); got \(3,\)"):
        credit_rewards(a, sh, s, mask[0])
    with pytest.raises(ValueError, match=r"shuffled must have shape \[M, B, T\] = \[M, 2, 3\].*got \(2, 3\)"):
        credit_rewards(a, sh[0], s, mask)
    with pytest.raises(ValueError, match=r"shuffled must have shape \[M, B, T\].*got \(2, 3, 3\)"):
        sequence_pmi(a, torch.zeros(2, 3, 3), s, mask)
    with pytest.raises(ValueError, match=r"aligned must have shape \[B, T\]; got \(2, 3, 1\)"):
        sdpo_rewards(a[..., None], s, mask)


def test_zero_partners_raises():
    a, sh, s, mask = _inputs(2, 3, 1)
    with pytest.raises(ValueError, match=r"shuffled has M = 0 partners; CREDIT needs M >= 1"):
        credit_rewards(a, sh[:0], s, mask)
    with pytest.raises(ValueError, match=r"sequence_pmi: shuffled has M = 0"):
        sequence_pmi(a, sh[:0], s, mask)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    a, sh, s, mask = _inputs(4, 65, 3)
    cpu = credit_rewards(a, sh, s, mask, lam=0.5, baseline="logmeanexp")
    gpu = credit_rewards(a.cuda(), sh.cuda(), s.cuda(), mask.cuda(), lam=0.5, baseline="logmeanexp")
    assert gpu.device.type == "cuda"
    assert_close_verbose(gpu.cpu(), cpu, atol=1e-5, name="cuda vs cpu")
    with pytest.raises(ValueError, match=r"same device"):
        credit_rewards(a.cuda(), sh, s, mask)


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only check of the device guard")
def test_device_guard_message_lists_devices():
    a, sh, s, mask = _inputs(2, 3, 1)
    with pytest.raises(ValueError, match=r"all tensors must be on the same device; got aligned on cpu, .*mask on meta"):
        credit_rewards(a, sh, s, mask.to("meta"))
