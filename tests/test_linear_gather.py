"""linear_gather: every backend against an fp64 oracle, the tail, duplicate ids, gradients, bad input,
torch.library."""

import importlib

import pytest
import torch

from credit_kernels import _core
from credit_kernels.reference import linear_gather_ref
from tests.utils import (
    HAS_TRITON,
    INTERPRET,
    assert_close_verbose,
    check_logit_gradients,
    large_logit_inputs,
    naive_logit_grads,
)
from tests.utils import logits_inputs as _inputs
from tests.utils import random_ids as _random_ids

# the module, not the function of the same name that credit_kernels re-exports
lg = importlib.import_module("credit_kernels.linear_gather")
linear_gather = lg.linear_gather

CPU_BACKENDS = (["torch"] + (["cpp"] if _core.has_cpp_op("linear_gather_fwd") else [])
                + (["triton"] if HAS_TRITON and INTERPRET else []))

# (N, d, V, k): odd and aligned; big V only with few rows (the interpreter pays per tile).
SHAPES = [(1, 16, 1000, 1), (37, 31, 1000, 100), (5, 31, 50257, 20), (3, 16, 151937, 5)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # NaN in every scratch buffer, so an element a kernel forgets to write shows
    monkeypatch.setattr(_core, "POISON", True)


# ---- forward vs fp64 ----


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_forward_matches_fp64(backend, shape, dtype):
    n, d, vocab, k = shape
    if backend == "triton" and vocab > 60000 and dtype != torch.float32:
        pytest.skip("interpreter time: the largest vocabulary runs once, in fp32")
    hidden, weight = _inputs(n, d, vocab, dtype)
    ids = _random_ids(n, vocab, k)
    out = linear_gather(hidden, weight, ids, temperature=1.3, backend=backend)
    ref_logp, ref_tail = linear_gather_ref(hidden.double(), weight.double(), ids, temperature=1.3)
    assert out.logp.dtype == out.tail.dtype == torch.float32
    assert_close_verbose(out.logp, ref_logp, atol=2e-5, name="logp")
    assert_close_verbose(out.tail, ref_tail, atol=2e-5, rtol=1e-5, name="tail")
    no_tail = linear_gather(hidden, weight, ids, temperature=1.3, tail=False, backend=backend)
    assert no_tail.tail is None
    assert torch.equal(no_tail.logp, out.logp)


# ---- the tail ----


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tail_stays_finite_when_gathered_mass_is_one(backend):
    n, d, vocab = 4, 16, 5003
    hidden, weight = _inputs(n, d, vocab, torch.float32)
    # token 11 gets logit 80 in every row, the others |z| < ~20: the rest holds ~e^-60 of the mass
    hidden[:, 0] = 1.0
    weight[11] = 0.0
    weight[11, 0] = 80.0
    ids = torch.tensor([[11, 3, 4], [11, 11, 9], [11, 5003 - 1, 0], [11, 2, 2]])
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = linear_gather(h, w, ids, backend=backend)
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    ref_logp, ref_tail = linear_gather_ref(h64, w64, ids)
    naive = torch.log1p(-out.logp[:, :1].exp().sum(-1))  # what log(1 - sum p) gives in fp32
    assert not torch.isfinite(naive).all(), "the case must defeat the naive formula"
    assert torch.isfinite(out.tail).all() and (out.tail < -40).all()
    assert_close_verbose(out.tail, ref_tail, atol=1e-4, rtol=1e-6, name="tail")
    assert_close_verbose(out.logp, ref_logp, atol=1e-4, name="logp")
    g = torch.randn(n)
    (out.tail * g).sum().backward()
    (ref_tail * g.double()).sum().backward()
    assert_close_verbose(h.grad, h64.grad, atol=1e-4, rtol=1e-4, name="d_hidden (tail)")
    assert_close_verbose(w.grad, w64.grad, atol=1e-4, rtol=1e-4, name="d_weight (tail)")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tail_is_minus_inf_when_ids_cover_the_vocabulary(backend):
    n, d, vocab = 3, 8, 64
    hidden, weight = _inputs(n, d, vocab, torch.float32)
    ids = torch.stack([torch.randperm(vocab) for _ in range(n)])
    ids = torch.cat([ids, ids[:, :5]], dim=1)  # plus duplicates
    ids[2, 7] = ids[2, 8]  # row 2 misses one id: a finite tail equal to that token's log-prob
    h = hidden.clone().requires_grad_()
    out = linear_gather(h, weight, ids, backend=backend)
    assert out.tail[0] == float("-inf") and out.tail[1] == float("-inf")
    missing = int(torch.tensor([v for v in range(vocab) if v not in ids[2].tolist()]))
    exact = linear_gather_ref(hidden.double(), weight.double(), torch.tensor([[missing]]).expand(n, 1))[0]
    assert_close_verbose(out.tail[2], exact[2, 0], atol=1e-5, name="tail of one token")
    # a -inf tail has zero gradient whatever its upstream gradient (documented); the rest is unaffected
    g_logp, g_tail = torch.randn(n, ids.shape[1]), torch.randn(n)
    (d_h,) = torch.autograd.grad([out.logp, out.tail], [h], [g_logp, g_tail])
    h64 = hidden.double().requires_grad_()
    r_logp, r_tail = linear_gather_ref(h64, weight.double(), ids)
    ((r_logp * g_logp.double()).sum() + (r_tail[2] * g_tail[2].double())).backward()
    assert torch.isfinite(d_h).all()
    assert_close_verbose(d_h, h64.grad, atol=1e-5, name="d_hidden")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_duplicate_ids_gathered_at_each_position_counted_once(backend):
    hidden, weight = _inputs(5, 16, 300, torch.float32)
    ids = torch.tensor([[3, 3, 3, 7]] * 5)
    out = linear_gather(hidden, weight, ids, backend=backend)
    assert (out.logp[:, 0] == out.logp[:, 1]).all() and (out.logp[:, 1] == out.logp[:, 2]).all()
    once = linear_gather(hidden, weight, ids[:, 2:], backend=backend)
    assert_close_verbose(out.tail, once.tail, atol=1e-6, name="tail with and without duplicates")
    p = out.logp[:, [0, 3]].double().exp().sum(-1)
    assert_close_verbose(out.tail, torch.log1p(-p), atol=1e-5, name="tail = log(1 - distinct mass)")


# ---- gradients ----


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "shape, dtype",
    [((37, 31, 1000, 20), torch.float32), ((37, 31, 1000, 20), torch.bfloat16), ((37, 31, 1000, 20), torch.float16),
     ((3, 31, 50257, 7), torch.float32), ((3, 31, 50257, 7), torch.bfloat16)],
)
def test_gradients_random_upstream(backend, shape, dtype):
    check_logit_gradients("gather", backend, shape, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_wrt_one_input_and_one_output(backend):
    hidden, weight = _inputs(20, 16, 300, torch.float32)
    w = weight.clone().requires_grad_()
    ids = _random_ids(20, 300, 6)
    linear_gather(hidden, w, ids, backend=backend).tail.sum().backward()
    w64 = weight.double().requires_grad_()
    linear_gather_ref(hidden.double(), w64, ids)[1].sum().backward()
    assert_close_verbose(w.grad, w64.grad, atol=1e-5, name="d_weight via tail")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("output", ["logp", "tail"])
def test_backward_precision_at_large_logits(backend, output):
    # issue 9, section 3: |logit| ~ 1.3e4 in fp32; no worse than the fp32 materialised path (see
    # tests/test_linear_logprob.py::test_backward_precision_at_large_logits)
    hidden, weight = large_logit_inputs()
    n, vocab, k = hidden.shape[0], weight.shape[0], 6
    ids = _random_ids(n, vocab, k - 1)
    ids = torch.cat([ids, (hidden @ weight.T).argmax(-1, keepdim=True)], 1)  # the top token: most of the mass
    g_logp = torch.randn(n, k) if output == "logp" else torch.zeros(n, k)
    g_tail = torch.randn(n) if output == "tail" else torch.zeros(n)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = linear_gather(h, w, ids, backend=backend)
    ((out.logp * g_logp).sum() + (out.tail * g_tail).sum()).backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    r_logp, r_tail = linear_gather_ref(h64, w64, ids)
    ((r_logp * g_logp.double()).sum() + (r_tail * g_tail.double()).sum()).backward()
    nh, nw = naive_logit_grads(hidden, weight, ids, g_logp, g_tail, 1.0, tail=True, log_softmax=True)
    for ours, base, exact, name in [(h.grad, nh, h64.grad, "d_hidden"), (w.grad, nw, w64.grad, "d_weight")]:
        err = (ours.double() - exact).abs().max().item()
        bar = (base.double() - exact).abs().max().item()
        assert err <= 1.5 * bar + 1e-6, f"{name}: ours {err:.3g} vs fp32 materialised {bar:.3g}"


def test_backends_agree():
    hidden, weight = _inputs(33, 24, 700, torch.float32)
    ids = _random_ids(33, 700, 9)
    gathers = {b: linear_gather(hidden, weight, ids, backend=b) for b in CPU_BACKENDS}
    for b in CPU_BACKENDS:
        assert_close_verbose(gathers[b].logp, gathers["torch"].logp, atol=1e-5, name=f"{b} gather logp")
        assert_close_verbose(gathers[b].tail, gathers["torch"].tail, atol=1e-5, name=f"{b} tail")


# ---- bad input ----


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda h, w, i: linear_gather(h, w, i.clone().fill_(50)), ValueError,
         r"ids must lie in \[0, V=50\); ids\[0, 0\] = 50"),
        (lambda h, w, i: linear_gather(h, w, i.clone().fill_(-1)), ValueError, "ids must lie in"),
        (lambda h, w, i: linear_gather(h, w, i.float()), TypeError, "ids must be an integer tensor"),
        (lambda h, w, i: linear_gather(h, w, i.tolist()), TypeError, "ids must be an integer tensor"),
        (lambda h, w, i: linear_gather(h, w, i[:-1]), ValueError, r"ids must have shape \(6,\) \+ \(k,\)"),
        (lambda h, w, i: linear_gather(h, w, i[:, 0]), ValueError, "ids must have shape"),
        (lambda h, w, i: linear_gather(h, w, i[:, :0]), ValueError, "k >= 1"),
        (lambda h, w, i: linear_gather(h, w, i.to("meta")), ValueError, "ids must be on hidden's device"),
        (lambda h, w, i: linear_gather(h, w.clone().index_fill_(0, torch.tensor([1]), float("nan")), i), ValueError,
         "linear_gather: weight contains NaN"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    hidden, weight = _inputs(6, 8, 50, torch.float32)
    with pytest.raises(exc, match=match):
        call(hidden, weight, _random_ids(6, 50, 4))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_input_raises_on_every_backend(backend):
    hidden, weight = _inputs(6, 8, 300, torch.float32)
    hidden[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"linear_gather: hidden contains NaN/inf"):
        linear_gather(hidden, weight, _random_ids(6, 300, 4), backend=backend)


def test_unchecked_nan():
    hidden, weight = _inputs(6, 8, 300, torch.float32)
    # check_inputs=False: NaN propagates to the affected row only
    bad = hidden.clone()
    bad[1, 0] = float("nan")
    out = linear_gather(bad, weight, _random_ids(6, 300, 3), check_inputs=False, backend="torch")
    assert torch.isnan(out.logp[1]).all() and torch.isfinite(out.logp[0]).all()


# ---- torch.library ----


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    hidden, weight = _inputs(9, 16, 300, torch.float32)
    ids = _random_ids(9, 300, 5)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    torch.library.opcheck(lg._linear_gather_op, (h, w, ids, 0.9, True, backend))
    torch.library.opcheck(lg._linear_gather_op, (h, w, ids, 1.0, False, backend))
