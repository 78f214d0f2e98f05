"""credit_reward: every backend against the oracle (credit.rewards) and fp64, identities, bad input, torch.library."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from credit import credit_rewards, sdpo_rewards, sequence_pmi
from credit_kernels import _core, _ext
from tests.utils import HAS_CUDA, HAS_TRITON, INTERPRET, assert_close_verbose

# the module, not the function of the same name that credit_kernels may re-export
cr = importlib.import_module("credit_kernels.credit_reward")
credit_reward = cr.credit_reward

CPU_BACKENDS = ["torch"] + (["cpp"] if _ext.HAS_EXT else []) + (["triton"] if HAS_TRITON and INTERPRET else [])
# (B, T, M): odd sizes; T = 600 spans two interpreter tiles (BLOCK_T = 512), B = 37 three row blocks (BLOCK_B = 16)
SHAPES = [(1, 1, 1), (3, 7, 2), (5, 33, 3), (2, 600, 4), (37, 129, 1), (4, 50, 17)]
RTOL = 1e-6  # relative to the natural scale of each value (see _scales): fp32 summation order only


def _inputs(b, t, m, dtype=torch.float32, p_mask=0.7, device="cpu"):
    """Log-prob-like values in [-12, 0] and a random mask (the first token of each row kept)."""
    a = -12 * torch.rand(b, t, dtype=torch.float64)
    sh = -12 * torch.rand(m, b, t, dtype=torch.float64)
    s = -12 * torch.rand(b, t, dtype=torch.float64)
    mask = torch.rand(b, t) < p_mask
    mask[:, :1] = True
    return a.to(dtype).to(device), sh.to(dtype).to(device), s.to(dtype).to(device), mask.to(device)


def _poison(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NaN / +inf / -inf at masked positions: every output must ignore them."""
    junk = torch.tensor([math.nan, math.inf, -math.inf], dtype=x.dtype, device=x.device)
    junk = junk[torch.arange(x.numel(), device=x.device) % 3].view(x.shape)
    return torch.where(mask.expand(x.shape), x, junk)


def _fp64_ref(a, sh, s, mask, lam, baseline):
    """fp64 truth from the (rounded) inputs: rewards [B, T] and the three row diagnostics."""
    keep = mask != 0
    a, sh, s = (torch.where(keep, x.double(), 0.0) for x in (a, sh, s))
    num = sh.shape[0]
    mean = sh.mean(0)
    beta = mean if baseline == "mean" else torch.logsumexp(sh, 0) - math.log(num)
    r = torch.where(keep, a - s - lam * (beta - s), 0.0)
    contrastive = a.sum(-1) - (torch.logsumexp(sh.sum(-1), 0) - math.log(num))
    return r, (a - s).sum(-1), contrastive, torch.where(keep, a - mean, 0.0).sum(-1)


def _scales(a, sh, s, mask):
    """The size each output's rounding error is relative to: the magnitudes its fp32 evaluation adds up."""
    keep = mask != 0
    a, sh, s = (torch.where(keep, x.double().abs(), 0.0) for x in (a, sh, s))
    bmax = sh.amax(0)
    token = a + 2 * s + bmax + 1.0
    return token, (a + s).sum(-1) + 1.0, (a + bmax).sum(-1) + 1.0, (a + bmax).sum(-1) + 1.0


def _assert_matches(out, expected, scales, rtol, what):
    """|got - expected| <= rtol * scale elementwise, for the four outputs."""
    names = ("rewards", "pmi", "contrastive_pmi", "contrastive_pmi_surrogate")
    for got, exp, scale, name in zip(out, expected, scales, names):
        assert got.dtype == torch.float32, f"{what} {name}: dtype {got.dtype}"
        assert got.shape == exp.shape, f"{what} {name}: shape {tuple(got.shape)} != {tuple(exp.shape)}"
        err = (got.double().cpu() - exp.double().cpu()).abs()
        bad = err > rtol * scale.cpu()
        assert not bad.any(), (
            f"{what} {name}: {int(bad.sum())} element(s) beyond {rtol:g} x scale; worst |err| {err.max():.3g}, "
            f"got {got.flatten()[err.flatten().argmax()]:.8g} expected {exp.flatten()[err.flatten().argmax()]:.8g}"
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("b, t, m", SHAPES)
@pytest.mark.parametrize("baseline", ["mean", "logmeanexp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_oracle_and_fp64(backend, b, t, m, baseline, dtype, monkeypatch):
    monkeypatch.setattr(_core, "POISON", True)  # an output element the kernel forgets to write stays NaN
    a, sh, s, mask = _inputs(b, t, m, dtype)
    pa, psh, ps = _poison(a, mask), _poison(sh, mask), _poison(s, mask)
    out = credit_reward(pa, psh, ps, mask, lam=0.3, baseline=baseline, backend=backend)
    assert out.rewards.shape == (b, t) and out.pmi.shape == out.contrastive_pmi.shape == (b,)
    masked = out.rewards[~mask]
    assert (masked == 0).all() and not torch.signbit(masked).any(), "masked rewards must be exactly +0.0"
    oracle = (credit_rewards(pa, psh, ps, mask, lam=0.3, baseline=baseline), *sequence_pmi(pa, psh, ps, mask))
    scales = _scales(a, sh, s, mask)
    _assert_matches(out, oracle, scales, RTOL, f"{backend} vs oracle")
    _assert_matches(out, _fp64_ref(a, sh, s, mask, 0.3, baseline), scales, RTOL, f"{backend} vs fp64")


@pytest.mark.skipif(not _ext.HAS_EXT, reason="credit_kernels._C not built")
@pytest.mark.parametrize("m", [1, 2])
def test_cpp_rewards_bit_identical_to_oracle(m):
    # With M <= 2 the partner sum has one rounding whatever the order, so the C++ kernel, which follows the
    # oracle's fp32 operation order, must reproduce the oracle's rewards bit for bit.
    a, sh, s, mask = _inputs(6, 301, m)
    for lam in (0.0, 0.3, 0.77, 1.0):
        ours = credit_reward(a, sh, s, mask, lam=lam, backend="cpp").rewards
        assert torch.equal(ours, credit_rewards(a, sh, s, mask, lam=lam)), f"lam={lam}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_identities(backend):
    b, t, m = 5, 70, 3
    a, sh, s, mask = _inputs(b, t, m)
    sd = sdpo_rewards(a, s, mask)
    for baseline in ("mean", "logmeanexp"):
        # lam = 0 is SDPO, exactly: (a - s) - 0 * (beta - s)
        out = credit_reward(a, sh, s, mask, lam=0.0, baseline=baseline, backend=backend)
        assert torch.equal(out.rewards, sd), baseline
    # lam = 1 is the pure contrast a - mean_m b
    contrast = torch.where(mask, a.double() - sh.double().mean(0), 0.0)
    out = credit_reward(a, sh, s, mask, lam=1.0, backend=backend)
    assert_close_verbose(out.rewards, contrast, atol=1e-5, name="lam=1")
    # the surrogate is the row sum of that contrast, the pMI the row sum of SDPO's reward
    assert_close_verbose(out.contrastive_pmi_surrogate, contrast.sum(-1), atol=1e-4, name="surrogate")
    assert_close_verbose(out.pmi, sd.double().sum(-1), atol=1e-4, name="pmi")
    # M = 1: "logmeanexp" is "mean" (logsumexp of one value is the value), and the contrastive pMI its surrogate
    one = sh[:1]
    lme = credit_reward(a, one, s, mask, lam=0.7, baseline="logmeanexp", backend=backend)
    mean = credit_reward(a, one, s, mask, lam=0.7, baseline="mean", backend=backend)
    assert torch.equal(lme.rewards, mean.rewards)
    assert_close_verbose(lme.contrastive_pmi, lme.contrastive_pmi_surrogate, atol=1e-4, name="M=1 contrastive")
    # teacher = student: zero SDPO reward and zero pMI, exactly
    same = credit_reward(s, sh, s, mask, lam=0.0, backend=backend)
    assert torch.equal(same.rewards, torch.zeros(b, t)) and torch.equal(same.pmi, torch.zeros(b))
    # Jensen: the surrogate bounds the contrastive pMI from above
    out = credit_reward(a, sh, s, mask, backend=backend)
    assert (out.contrastive_pmi <= out.contrastive_pmi_surrogate + 1e-3).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strides_mixed_dtypes_and_mask_kinds(backend):
    b, t, m = 6, 45, 3
    a, sh, s, mask = _inputs(b, t, m)
    wide = torch.randn(b, 2 * t)
    wide[:, ::2] = a
    a_view = wide[:, ::2]  # T stride 2
    sh_view = sh.transpose(0, 1).contiguous().transpose(0, 1)  # [M, B, T] laid out as [B, M, T]
    s_half = s.half()  # mixed dtypes: fp32, fp32 view, fp16
    masks = {
        "bool": mask,
        "float": torch.where(mask, torch.tensor([2.5, -1.0, 1.0]).repeat(t)[:t], 0.0),  # any non-zero is 1
        "int": mask.to(torch.int32) * 7,
        "bool, T stride 3": torch.stack([mask] * 3, -1)[..., 1],
        "expanded row": mask[:1].expand(b, t),
    }
    for kind, msk in masks.items():
        out = credit_reward(a_view, sh_view, s_half, msk, lam=0.4, baseline="logmeanexp", backend=backend)
        keep = msk != 0
        oracle = (credit_rewards(a, sh, s_half, keep, lam=0.4, baseline="logmeanexp"), *sequence_pmi(a, sh, s_half,
                                                                                                       keep))
        _assert_matches(out, oracle, _scales(a, sh, s_half, keep), RTOL, f"{backend} mask {kind}")
    # fp64 inputs are cast to fp32 first, as the oracle does
    out = credit_reward(a.double(), sh.double(), s.double(), mask, backend=backend)
    oracle = (credit_rewards(a.double(), sh.double(), s.double(), mask), *sequence_pmi(a.double(), sh.double(),
                                                                                       s.double(), mask))
    _assert_matches(out, oracle, _scales(a, sh, s, mask), RTOL, f"{backend} fp64 inputs")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_masked_rows_and_empty_shapes(backend):
    a, sh, s, mask = _inputs(4, 20, 2)
    mask[1] = False
    mask[3] = False
    out = credit_reward(_poison(a, mask), _poison(sh, mask), _poison(s, mask), mask, backend=backend)
    for row in (1, 3):
        assert (out.rewards[row] == 0).all() and out.pmi[row] == 0 and out.contrastive_pmi_surrogate[row] == 0
        assert abs(out.contrastive_pmi[row]) < 1e-6  # A = 0, B_m = 0: 0 - (log M - log M)
    for b, t in ((0, 5), (3, 0), (0, 0)):
        keep = torch.ones(b, t, dtype=torch.bool)
        e = credit_reward(torch.zeros(b, t), torch.zeros(2, b, t), torch.zeros(b, t), keep, backend=backend)
        assert e.rewards.shape == (b, t) and e.pmi.shape == (b,)
        assert (e.pmi == 0).all() and (e.contrastive_pmi.abs() < 1e-6).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_long_rows_and_large_magnitudes(backend):
    # |b| up to 1e3 per token: B_m sums of ~1e5 that differ by thousands; logsumexp must stay finite and exact
    b, t, m = 3, 900, 5
    a, sh, s, mask = _inputs(b, t, m)
    sh = sh * 80
    out = credit_reward(a, sh, s, mask, baseline="logmeanexp", backend=backend)
    assert torch.isfinite(out.contrastive_pmi).all()
    _assert_matches(out, _fp64_ref(a, sh, s, mask, 0.5, "logmeanexp"), _scales(a, sh, s, mask), RTOL,
                    f"{backend} large")


def test_backend_resolution_and_override():
    cpu = torch.device("cpu")
    assert cr.resolve_backend("auto", cpu) == ("cpp" if _ext.HAS_EXT else "torch")
    with _ext.override_ext(False):
        assert cr.resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        cr.resolve_backend("gpu", cpu)
    with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors only"):
        cr.resolve_backend("cuda", cpu)
    if not INTERPRET and not HAS_CUDA:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            cr.resolve_backend("triton", cpu)
    if HAS_CUDA and not _ext.HAS_EXT_CUDA:
        with pytest.raises(ValueError, match="has no CUDA kernels|not built|without CUDA"):
            cr.resolve_backend("cuda", torch.device("cuda"))


@pytest.mark.parametrize(
    "make, kw, exc, match",
    [
        (lambda a, sh, s, k: (a, sh, s[:, :-1], k), {}, ValueError, r"student must have shape \[B, T\] = \(4, 9\)"),
        (lambda a, sh, s, k: (a, sh[:, :-1], s, k), {}, ValueError, r"shuffled must have shape \[M, B, T\]"),
        (lambda a, sh, s, k: (a, sh[0], s, k), {}, ValueError, r"shuffled must have shape \[M, B, T\]"),
        (lambda a, sh, s, k: (a, sh, s, k[:, :3]), {}, ValueError, r"mask must have shape \[B, T\]"),
        (lambda a, sh, s, k: (a[0], sh, s, k), {}, ValueError, r"aligned must have shape \[B, T\]"),
        (lambda a, sh, s, k: (a, sh[:0], s, k), {}, ValueError, "M = 0 partners"),
        (lambda a, sh, s, k: (a, sh[:1].expand(65, -1, -1), s, k), {}, ValueError, "M = 65 partners.*1 <= M <= 64"),
        (lambda a, sh, s, k: (a, sh, s, k), {"lam": -0.1}, ValueError, r"lam must be in \[0, 1\].*-0.1"),
        (lambda a, sh, s, k: (a, sh, s, k), {"lam": 1.5}, ValueError, r"lam must be in \[0, 1\].*1.5"),
        (lambda a, sh, s, k: (a, sh, s, k), {"lam": float("nan")}, ValueError, r"lam must be in \[0, 1\]"),
        (lambda a, sh, s, k: (a, sh, s, k), {"lam": True}, TypeError, "lam must be a real number"),
        (lambda a, sh, s, k: (a, sh, s, k), {"baseline": "max"}, ValueError, "baseline must be one of"),
        (lambda a, sh, s, k: (a, sh, s, k), {"backend": "gpu"}, ValueError, "backend must be one of"),
        (lambda a, sh, s, k: (a.long(), sh, s, k), {}, TypeError, "aligned must be a floating-point tensor"),
        (lambda a, sh, s, k: (a, sh.tolist(), s, k), {}, TypeError, "shuffled must be a torch.Tensor; got list"),
        (lambda a, sh, s, k: (a, sh, s, k.to(torch.complex64)), {}, TypeError, "mask must be bool or real"),
    ],
)
def test_bad_input_names_the_argument(make, kw, exc, match):
    a, sh, s, mask = _inputs(4, 9, 2)
    with pytest.raises(exc, match=match):
        credit_reward(*make(a, sh, s, mask), **kw)


@pytest.mark.skipif(not _ext.HAS_EXT, reason="credit_kernels._C not built")
def test_compiled_op_checks_its_own_inputs():
    # The raw op is reachable as torch.ops.credit_C.credit_reward: its TORCH_CHECKs must say what is wrong.
    a, sh, s, mask = _inputs(3, 8, 2)
    op = torch.ops.credit_C.credit_reward
    cases = [
        ((a, sh, s[:, :5], mask, 0.5, "mean"), r"student must have shape \(B, T\) = \[3, 8\], got \[3, 5\]"),
        ((a, sh[:, :2], s, mask, 0.5, "mean"), r"shuffled must have shape \(M, B, T\)"),
        ((a, sh[:0], s, mask, 0.5, "mean"), "M >= 1 partners, got M = 0"),
        ((a, sh.half(), s, mask, 0.5, "mean"), "must share a dtype"),
        ((a, sh, s, mask, 1.5, "mean"), r"lam must be in \[0, 1\], got 1.5"),
        ((a, sh, s, mask, 0.5, "max"), 'baseline must be "mean" or "logmeanexp", got "max"'),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            op(*args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "name, value, baseline",
    [("aligned", math.nan, "mean"), ("student", math.inf, "mean"), ("shuffled", math.nan, "logmeanexp"),
     ("shuffled", -math.inf, "logmeanexp"), ("aligned", -math.inf, "logmeanexp")],
)
def test_non_finite_unmasked_input_raises(backend, name, value, baseline):
    # The fused op detects these from its [B] outputs (one sync), then names the input. -inf in one partner under
    # "logmeanexp" leaves the rewards finite: the surrogate (mean over partners) must still catch it.
    a, sh, s, mask = _inputs(3, 11, 3)
    inputs = {"aligned": a, "shuffled": sh, "student": s}
    target = inputs[name]
    (target[1] if name == "shuffled" else target)[2, 5] = value
    mask[2, 5] = True
    with pytest.raises(ValueError, match=rf"credit_reward: {name} has 1 non-finite .* unmasked positions"):
        credit_reward(inputs["aligned"], inputs["shuffled"], inputs["student"], mask, baseline=baseline,
                      backend=backend)
    # check_inputs=False: the row comes out non-finite, as the oracle's does; the other rows are untouched
    out = credit_reward(inputs["aligned"], inputs["shuffled"], inputs["student"], mask, baseline=baseline,
                        backend=backend, check_inputs=False)
    assert not torch.isfinite(torch.stack([out.pmi[2], out.contrastive_pmi_surrogate[2]])).all()
    assert torch.isfinite(out.rewards[:2]).all() and torch.isfinite(out.pmi[:2]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp32_overflow_of_finite_inputs_raises(backend):
    a, sh, s, mask = _inputs(2, 4, 1)
    a[0, 0] = a[0, 1] = 3e38
    mask[0, :2] = True
    with pytest.raises(ValueError, match="overflowed fp32"):
        credit_reward(a, sh, s, mask, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_outputs_carry_no_gradient(backend):
    a, sh, s, mask = _inputs(2, 5, 2)
    s = s.requires_grad_()
    out = credit_reward(a, sh, s, mask, backend=backend)
    assert not any(t.requires_grad for t in out)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("baseline", ["mean", "logmeanexp"])
def test_opcheck(backend, baseline):
    a, sh, s, mask = _inputs(5, 23, 3)
    torch.library.opcheck(cr._credit_reward_op, (a, sh, s, mask, 0.5, baseline, backend))
    torch.library.opcheck(cr._credit_reward_op, (a.bfloat16(), sh, s.half(), mask.float(), 0.2, baseline, backend))


def test_torch_compile_fullgraph():
    a, sh, s, mask = _inputs(4, 31, 2)
    backend = "cpp" if _ext.HAS_EXT else "torch"

    def advantages(a, sh, s, mask):
        out = credit_reward(a, sh, s, mask, lam=0.5, baseline="logmeanexp", backend=backend)
        return out.rewards * 2.0 + out.pmi[:, None], out.contrastive_pmi

    compiled = torch.compile(advantages, fullgraph=True, backend="aot_eager")
    for got, exp in zip(compiled(a, sh, s, mask), advantages(a, sh, s, mask)):
        assert torch.equal(got, exp)


# ---- GPU (skipped without CUDA) ----

GPU_BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.skipif(not _ext.HAS_EXT_CUDA,
                                                                         reason="_C built without CUDA kernels"))]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("b, t, m", [(256, 8192, 4), (7, 40000, 1), (4096, 100, 2), (33, 3001, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("baseline", ["mean", "logmeanexp"])
def test_gpu_matches_oracle(backend, b, t, m, dtype, baseline, monkeypatch):
    monkeypatch.setattr(_core, "POISON", True)
    a, sh, s, mask = _inputs(b, t, m, dtype, device="cuda")
    pa, psh, ps = _poison(a, mask), _poison(sh, mask), _poison(s, mask)
    out = credit_reward(pa, psh, ps, mask, lam=0.3, baseline=baseline, backend=backend)
    masked = out.rewards[~mask]
    assert (masked == 0).all() and not torch.signbit(masked).any()
    oracle = (credit_rewards(pa, psh, ps, mask, lam=0.3, baseline=baseline), *sequence_pmi(pa, psh, ps, mask))
    # GPU exp/log and fma contraction cost a few ulp more than the CPU kernels
    _assert_matches(out, oracle, _scales(a, sh, s, mask), 4 * RTOL, f"{backend} vs oracle")
    sd = sdpo_rewards(a, s, mask)
    assert torch.equal(credit_reward(a, sh, s, mask, lam=0.0, baseline=baseline, backend=backend).rewards, sd)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_strides_and_auto(backend):
    a, sh, s, mask = _inputs(64, 777, 3, torch.bfloat16, device="cuda")
    sh_view = sh.transpose(0, 1).contiguous().transpose(0, 1)
    out = credit_reward(a[:, ::2], sh_view[..., ::2], s.half()[:, ::2], mask[:, ::2].float(), backend=backend)
    args = (a[:, ::2], sh[..., ::2], s.half()[:, ::2], mask[:, ::2])
    oracle = (credit_rewards(*args), *sequence_pmi(*args))
    _assert_matches(out, oracle, _scales(*args), 4 * RTOL, f"{backend} strided")
    assert cr.resolve_backend("auto", a.device) == "triton"
