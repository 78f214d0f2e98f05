"""linear_logprob: every backend against an fp64 oracle, gradients, options, bad input, torch.library."""

import importlib

import pytest
import torch

from credit_kernels import _core, _ext, linear_logprob, linear_logprob_ref
from tests.utils import HAS_CUDA, HAS_TRITON, INTERPRET, assert_close_verbose, large_logit_inputs

# the module, not the function of the same name that credit_kernels re-exports
ll = importlib.import_module("credit_kernels.linear_logprob")

CPU_BACKENDS = ["torch"] + (["cpp"] if _ext.HAS_EXT else []) + (["triton"] if HAS_TRITON and INTERPRET else [])

# (N, d, V): odd and aligned; the interpreter is slow, so big V only with few rows.
SHAPES = [(1, 16, 1000), (37, 31, 1000), (70, 48, 777), (5, 31, 50257), (3, 16, 151937)]


def _inputs(n, d, vocab, dtype, *, scale=1.0, ignore_frac=0.2, device="cpu"):
    hidden = (torch.randn(n, d) * scale).to(dtype).to(device)
    weight = (torch.randn(vocab, d) / d**0.5 * 4).to(dtype).to(device)
    targets = torch.randint(0, vocab, (n,))
    targets[torch.rand(n) < ignore_frac] = -100
    return hidden, weight, targets.to(device)


def _oracle(hidden, weight, targets, **kw):
    return linear_logprob_ref(hidden.double(), weight.double(), targets, **kw)


def _same_dtype_error(hidden, weight, targets, expected, temperature=1.0):
    """Error of the plain same-dtype torch path (matmul in the input dtype, fp32 log_softmax)."""
    logits = (hidden @ weight.T).float() / temperature
    naive = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    naive = torch.where(targets != -100, naive, torch.zeros_like(naive))
    return (naive.double() - expected).abs().max().item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_fp64(backend, shape, dtype, monkeypatch):
    monkeypatch.setattr(_core, "POISON", True)
    hidden, weight, targets = _inputs(*shape, dtype)
    logp, entropy, lse = linear_logprob(
        hidden, weight, targets, temperature=0.7, return_entropy=True, return_lse=True, backend=backend
    )
    ref_logp, ref_ent, ref_lse = _oracle(hidden, weight, targets, temperature=0.7, return_entropy=True, return_lse=True)
    assert logp.dtype == entropy.dtype == lse.dtype == torch.float32
    # the inputs are exact in fp32, so only fp32 accumulation error remains, whatever the input dtype
    bound = 2 * _same_dtype_error(hidden, weight, targets, ref_logp, 0.7) + 2e-5
    assert_close_verbose(logp, ref_logp, atol=min(bound, 1e-4), name="logp")
    assert_close_verbose(entropy, ref_ent, atol=1e-4, name="entropy")
    assert_close_verbose(lse, ref_lse, atol=1e-4, name="lse")
    ignored = targets == -100
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all() and (lse[ignored] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(37, 31, 1000), (5, 31, 50257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradients_random_upstream(backend, shape, dtype, monkeypatch):
    monkeypatch.setattr(_core, "POISON", True)
    hidden, weight, targets = _inputs(*shape, dtype)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, entropy, lse = linear_logprob(h, w, targets, temperature=1.3, return_entropy=True, return_lse=True,
                                        backend=backend)
    g_logp, g_ent, g_lse = torch.randn(3, shape[0]).unbind(0)
    ((logp * g_logp).sum() + (entropy * g_ent).sum() + (lse * g_lse).sum()).backward()

    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    r_logp, r_ent, r_lse = _oracle(h64, w64, targets, temperature=1.3, return_entropy=True, return_lse=True)
    ((r_logp * g_logp.double()).sum() + (r_ent * g_ent.double()).sum() + (r_lse * g_lse.double()).sum()).backward()
    # the same-dtype torch path (bf16 matmuls, fp32 softmax) sets the bar: at most 2x its error, plus a little
    hn = hidden.clone().requires_grad_()
    wn = weight.clone().requires_grad_()
    logits = (hn @ wn.T).float() / 1.3
    n_lse = logits.logsumexp(-1)
    n_logp_all = logits - n_lse[:, None]
    keep = targets != -100
    n_logp = n_logp_all.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    n_ent = -(n_logp_all.exp() * n_logp_all).sum(-1)
    zero = torch.zeros(())
    (torch.where(keep, n_logp * g_logp + n_ent * g_ent + n_lse * g_lse, zero)).sum().backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    for ours, naive, exact, name in [(h.grad, hn.grad, h64.grad, "d_hidden"), (w.grad, wn.grad, w64.grad, "d_weight")]:
        bar = (naive.double() - exact).abs().max().item()
        assert_close_verbose(ours, exact, atol=2 * bar + 1e-4, name=name)
    ignored = targets == -100
    assert (h.grad[ignored] == 0).all(), "ignored rows must get zero gradient"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_wrt_one_input_only(backend):
    hidden, weight, targets = _inputs(20, 16, 300, torch.float32)
    h = hidden.clone().requires_grad_()
    linear_logprob(h, weight, targets, backend=backend).sum().backward()
    h64 = hidden.double().requires_grad_()
    _oracle(h64, weight, targets).sum().backward()
    assert_close_verbose(h.grad, h64.grad, atol=1e-5, name="d_hidden")
    w = weight.clone().requires_grad_()
    linear_logprob(hidden, w, targets, backend=backend, return_entropy=True)[1].sum().backward()
    w64 = weight.double().requires_grad_()
    _oracle(hidden, w64, targets, return_entropy=True)[1].sum().backward()
    assert_close_verbose(w.grad, w64.grad, atol=1e-5, name="d_weight")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_huge_logits_and_all_ignored(backend):
    # |logit| ~ 1e4: the online logsumexp must stay finite and exact in shifted units
    hidden, weight, targets = _inputs(19, 16, 500, torch.float32, scale=2000.0, ignore_frac=0.0)
    logp, ent = linear_logprob(hidden, weight, targets, return_entropy=True, backend=backend)
    ref_logp, ref_ent = _oracle(hidden, weight, targets, return_entropy=True)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert_close_verbose(logp, ref_logp, atol=2e-2, rtol=1e-6, name="logp")
    assert_close_verbose(ent, ref_ent, atol=2e-2, name="entropy")

    h = hidden.clone().requires_grad_()
    all_ignored = torch.full_like(targets, -100)
    logp = linear_logprob(h, weight, all_ignored, backend=backend)
    assert (logp == 0).all()
    logp.sum().backward()
    assert (h.grad == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batched_shapes_empty_and_custom_ignore_index(backend):
    hidden = torch.randn(2, 3, 16)
    weight = torch.randn(100, 16)
    targets = torch.randint(0, 100, (2, 3))
    targets[0, 1] = 7  # ignore_index may be a real vocabulary id
    out = linear_logprob(hidden, weight, targets, ignore_index=7, backend=backend)
    ref = _oracle(hidden.reshape(6, 16), weight, targets.reshape(6), ignore_index=7).reshape(2, 3)
    assert out.shape == (2, 3)
    assert_close_verbose(out, ref, atol=1e-5)
    assert out[0, 1] == 0

    empty = linear_logprob(torch.randn(0, 16), weight, torch.zeros(0, dtype=torch.long), backend=backend,
                           return_entropy=True)
    assert empty[0].shape == (0,) and empty[1].shape == (0,)


def test_backends_agree_and_ext_override():
    hidden, weight, targets = _inputs(33, 24, 700, torch.float32)
    outs = {b: linear_logprob(hidden, weight, targets, return_entropy=True, backend=b) for b in CPU_BACKENDS}
    for b, (logp, ent) in outs.items():
        assert_close_verbose(logp, outs["torch"][0], atol=1e-5, name=f"{b} logp")
        assert_close_verbose(ent, outs["torch"][1], atol=1e-5, name=f"{b} entropy")
    assert ll.resolve_backend("auto", torch.device("cpu")) == ("cpp" if _ext.HAS_EXT else "torch")
    with _ext.override_ext(False):
        assert ll.resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda h, w, t: (h[:, :-1], w, t), ValueError, "share d"),
        (lambda h, w, t: (h, w, t[:, None]), ValueError, "targets must have shape"),
        (lambda h, w, t: (h, w, t.float()), TypeError, "targets must be an integer"),
        (lambda h, w, t: (h, w, t.tolist()), TypeError, "targets must be an integer tensor"),
        (lambda h, w, t: (h, w, torch.where(t == 0, 5000, t).fill_(5000)), ValueError, r"targets\[0\] = 5000"),
        (lambda h, w, t: (h, w, t.clone().fill_(-3)), ValueError, "must lie in"),
        (lambda h, w, t: (h.double(), w.double(), t), TypeError, "hidden must be fp32, bf16 or fp16"),
        (lambda h, w, t: (h, w.half(), t), TypeError, "share a dtype"),
        (lambda h, w, t: (h.clone().index_fill_(0, torch.tensor([2]), float("nan")), w, t), ValueError,
         "hidden contains NaN"),
        (lambda h, w, t: (h, w.clone().index_fill_(0, torch.tensor([5]), float("inf")), t), ValueError,
         "weight contains NaN/inf"),
        (lambda h, w, t: (h, w[:0], t), ValueError, "V = 0"),
    ],
)
def test_bad_input_names_the_argument(make, exc, match):
    hidden, weight, targets = _inputs(6, 8, 50, torch.float32, ignore_frac=0.0)
    with pytest.raises(exc, match=match):
        linear_logprob(*make(hidden, weight, targets))


def test_bad_options():
    hidden, weight, targets = _inputs(6, 8, 50, torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        linear_logprob(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_logprob(hidden, weight, targets, backend="cuda")
    if not INTERPRET and not HAS_CUDA:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            linear_logprob(hidden, weight, targets, backend="triton")
    # check_inputs=False: NaN propagates to the affected row, as documented
    bad = hidden.clone()
    bad[1, 0] = float("nan")
    out = linear_logprob(bad, weight, targets.clamp(min=0), check_inputs=False, backend="torch")
    assert torch.isnan(out[1]) and torch.isfinite(out[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    hidden, weight, targets = _inputs(9, 16, 300, torch.float32)
    args = (hidden.requires_grad_(), weight.requires_grad_(), targets, 0.9, -100, True, backend)
    torch.library.opcheck(ll._linear_logprob_op, args)


def test_torch_compile_fullgraph():
    hidden, weight, targets = _inputs(12, 16, 200, torch.float32)
    backend = "cpp" if _ext.HAS_EXT else "torch"

    def loss_fn(h, w, t):
        logp, ent = linear_logprob(h, w, t, return_entropy=True, backend=backend)
        return -(logp * 2.0).sum() + ent.mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    compiled(h1, w1, targets).backward()
    loss_fn(h2, w2, targets).backward()
    assert_close_verbose(h1.grad, h2.grad, atol=1e-6)
    assert_close_verbose(w1.grad, w2.grad, atol=1e-6)


# ---- GPU (skipped without CUDA) ----


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1024, 1536, 151936), (4099, 896, 151937), (333, 4096, 50257)])
def test_gpu_bf16_error_no_worse_than_torch(shape):
    n, d, vocab = shape
    hidden, weight, targets = _inputs(n, d, vocab, torch.bfloat16, device="cuda")
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, ent = linear_logprob(h, w, targets, return_entropy=True, backend="triton")
    g = torch.randn(n, device="cuda")
    (logp * g).sum().backward()
    # fp32 oracle from the same bf16 inputs
    h32 = hidden.float().requires_grad_()
    w32 = weight.float().requires_grad_()
    ref = linear_logprob_ref(h32, w32, targets, chunk_rows=512)
    (ref * g).sum().backward()
    # the same-dtype torch path: bf16 matmul, fp32 log_softmax
    hb = hidden.clone().requires_grad_()
    wb = weight.clone().requires_grad_()
    naive = (hb @ wb.T).float().log_softmax(-1).gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    naive = torch.where(targets != -100, naive, torch.zeros_like(naive))
    (naive * g).sum().backward()
    for ours, base, exp, name in [(logp, naive, ref, "logp"), (h.grad, hb.grad, h32.grad, "d_hidden"),
                                  (w.grad, wb.grad, w32.grad, "d_weight")]:
        err = (ours.float() - exp).abs().max().item()
        base_err = (base.float() - exp).abs().max().item()
        assert err <= 2 * base_err + 1e-3, f"{name}: ours {err:.3g} vs torch bf16 {base_err:.3g}"


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="the chunked backward is the Triton path's")
def test_triton_backward_over_several_row_chunks(monkeypatch):
    # 37 rows in chunks of 16: d_weight accumulates in fp32 across chunks, d_hidden is written per chunk
    monkeypatch.setenv("CREDIT_BWD_CHUNK_ROWS", "16")
    monkeypatch.setattr(_core, "POISON", True)
    hidden, weight, targets = _inputs(37, 31, 1000, torch.bfloat16)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    g = torch.randn(37)
    (linear_logprob(h, w, targets, backend="triton") * g).sum().backward()
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    (_oracle(h64, w64, targets) * g.double()).sum().backward()
    assert_close_verbose(h.grad, h64.grad, atol=2e-3, rtol=1.6e-2, name="d_hidden")
    assert_close_verbose(w.grad, w64.grad, atol=2e-3, rtol=1.6e-2, name="d_weight")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("output", ["logp", "entropy", "lse"])
def test_backward_precision_at_large_logits(backend, output):
    # issue 9, section 3: the backward formed p = exp(z - lse) from one fp32 lse, whose rounding (~5e-4 at 1.3e4)
    # scales a whole row; it must be no worse than the fp32 materialised path, which shifts by the row max (torch's
    # own logsumexp backward uses its rounded output, so for the lse the two share that error)
    hidden, weight = large_logit_inputs()
    assert 1.1e4 < (hidden @ weight.T).abs().max() < 1.5e4
    targets = torch.randint(0, weight.shape[0], (hidden.shape[0],))
    g = torch.randn(hidden.shape[0])
    pick = ("logp", "entropy", "lse").index(output)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    outs = linear_logprob(h, w, targets, return_entropy=True, return_lse=True, backend=backend)
    (outs[pick] * g).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (_oracle(h64, w64, targets, return_entropy=True, return_lse=True)[pick] * g.double()).sum().backward()
    hn, wn = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    z = hn @ wn.T
    logp_all = z.log_softmax(-1)
    naive = (logp_all.gather(-1, targets[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1), z.logsumexp(-1))
    (naive[pick] * g).sum().backward()
    for ours, base, exact, name in [(h.grad, hn.grad, h64.grad, "d_hidden"), (w.grad, wn.grad, w64.grad, "d_weight")]:
        err = (ours.double() - exact).abs().max().item()
        bar = (base.double() - exact).abs().max().item()
        assert err <= 1.5 * bar + 1e-6, f"{name}: ours {err:.3g} vs fp32 materialised {bar:.3g}"
