"""linear_topk: every backend against an fp64 oracle, ties, gradients, bad input, torch.library (linear_gather has
tests/test_linear_gather.py; the two meet in the SDPO-shaped loss at the end)."""

import importlib

import pytest
import torch

from credit_kernels import _core, _ext
from credit_kernels.reference import linear_gather_ref, linear_topk_ref
from tests.utils import (
    HAS_CUDA,
    HAS_TRITON,
    INTERPRET,
    TRITON_DEVICE,
    assert_close_verbose,
    check_logit_gradients,
    large_logit_inputs,
    naive_logit_grads,
)
from tests.utils import logits_inputs as _inputs
from tests.utils import random_ids as _random_ids

# the modules, not the functions of the same names that credit_kernels may re-export
lt = importlib.import_module("credit_kernels.linear_topk")
lg = importlib.import_module("credit_kernels.linear_gather")
linear_topk, linear_gather = lt.linear_topk, lg.linear_gather
HAS_CPP = _core.has_cpp_op("linear_topk_fwd")

CPU_BACKENDS = ["torch"] + (["cpp"] if HAS_CPP else []) + (["triton"] if HAS_TRITON and INTERPRET else [])

# (N, d, V, k): odd and aligned; big V only with few rows (the interpreter pays per tile).
SHAPES = [(1, 16, 1000, 1), (37, 31, 1000, 100), (5, 31, 50257, 20), (3, 16, 151937, 5)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # NaN (int64: the largest key) in every scratch buffer, so an element a kernel forgets to write shows
    monkeypatch.setattr(_core, "POISON", True)


def _check_topk(out, hidden, weight, k, temperature, atol):
    """Values at each rank match the fp64 oracle; the ids too, except where the oracle has a near-tie."""
    ref_ids, ref_logp, ref_lse = linear_topk_ref(hidden.double(), weight.double(), min(k + 1, weight.shape[0]),
                                                 temperature=temperature)
    assert out.ids.dtype == torch.long and out.logp.dtype == out.lse.dtype == torch.float32
    assert_close_verbose(out.logp, ref_logp[:, :k], atol=atol, name="logp (by rank)")
    assert_close_verbose(out.lse, ref_lse, atol=atol, name="lse")
    # our ids carry our values: the exact log-prob at each returned id matches what we report
    exact_at_ids = linear_gather_ref(hidden.double(), weight.double(), out.ids, temperature=temperature, tail=False)[0]
    assert_close_verbose(out.logp, exact_at_ids, atol=atol, name="logp at the returned ids")
    gaps = (ref_logp[:, :-1] - ref_logp[:, 1:]).abs()
    near = torch.zeros_like(ref_logp, dtype=torch.bool)
    near[:, :-1] |= gaps < 1e-3
    near[:, 1:] |= gaps < 1e-3
    mismatch = (out.ids != ref_ids[:, :k]) & ~near[:, :k]
    assert not mismatch.any(), f"ids differ away from near-ties at {mismatch.nonzero()[:5].tolist()}"
    assert (out.ids.sort(dim=1).values.diff(dim=1) > 0).all(), "ids must be distinct within a row"


# ---- forward vs fp64 ----


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_forward_matches_fp64(backend, shape, dtype):
    n, d, vocab, k = shape
    if backend == "triton" and vocab > 60000 and dtype != torch.float32:
        pytest.skip("interpreter time: the largest vocabulary runs once, in fp32")
    hidden, weight = _inputs(n, d, vocab, dtype)
    out = linear_topk(hidden, weight, k, temperature=0.7, backend=backend)
    # the inputs are exact in fp32, so only fp32 accumulation error remains, whatever the input dtype
    _check_topk(out, hidden, weight, k, 0.7, atol=2e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_topk_ties_smaller_id_first(backend):
    # integer weights and hidden states: exact integer logits in a small range, so most values tie;
    # duplicated weight rows tie at every position
    n, d, vocab, k = 9, 16, 3000, 40
    weight = torch.randint(-2, 3, (vocab, d)).float()
    weight[2000:2400] = weight[100:500]
    weight[7] = weight[2999]
    hidden = torch.randint(-1, 2, (n, d)).float()
    hidden[0] = 0.0  # every logit equal: the answer is ids 0..k-1
    for temperature in (1.0, 0.7):
        out = linear_topk(hidden, weight, k, temperature=temperature, backend=backend)
        ref_ids, ref_logp, _ = linear_topk_ref(hidden.double(), weight.double(), k, temperature=temperature)
        assert torch.equal(out.ids, ref_ids), (out.ids - ref_ids).nonzero()[:5].tolist()
        assert torch.equal(out.ids[0], torch.arange(k))
        assert_close_verbose(out.logp, ref_logp, atol=1e-5, name="logp")
        # within a run of equal logits the ids ascend
        same = out.logp[:, 1:] == out.logp[:, :-1]
        assert (out.ids[:, 1:] > out.ids[:, :-1])[same].all()
    again = linear_topk(hidden, weight, k, backend=backend)
    assert torch.equal(again.ids, linear_topk(hidden, weight, k, backend=backend).ids)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_topk_k_equals_vocab_and_batched(backend):
    hidden, weight = _inputs(6, 16, 50, torch.float32)
    out = linear_topk(hidden.reshape(2, 3, 16), weight, 50, backend=backend)
    assert out.ids.shape == out.logp.shape == (2, 3, 50) and out.lse.shape == (2, 3)
    assert torch.equal(out.ids.reshape(6, 50).sort(dim=1).values, torch.arange(50).expand(6, 50))
    assert_close_verbose(out.logp.logsumexp(-1), torch.zeros(2, 3), atol=1e-5, name="sum p")
    assert (out.logp[..., 1:] <= out.logp[..., :-1]).all()
    empty = linear_topk(torch.randn(0, 16), weight, 5, backend=backend)
    assert empty.ids.shape == (0, 5) and empty.lse.shape == (0,)
    gathered = linear_gather(hidden.reshape(2, 3, 16), weight, out.ids[..., :7], backend=backend)
    assert gathered.logp.shape == (2, 3, 7) and gathered.tail.shape == (2, 3)
    assert_close_verbose(gathered.logp, out.logp[..., :7], atol=1e-5, name="gather at the top-k ids")
    empty = linear_gather(torch.randn(0, 16), weight, torch.zeros(0, 4, dtype=torch.long), backend=backend)
    assert empty.logp.shape == (0, 4) and empty.tail.shape == (0,)


# ---- gradients ----


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "shape, dtype",
    [((37, 31, 1000, 20), torch.float32), ((37, 31, 1000, 20), torch.bfloat16), ((37, 31, 1000, 20), torch.float16),
     ((3, 31, 50257, 7), torch.float32), ((3, 31, 50257, 7), torch.bfloat16)],
)
def test_gradients_random_upstream(backend, shape, dtype):
    check_logit_gradients("topk", backend, shape, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_wrt_one_input_and_one_output(backend):
    hidden, weight = _inputs(20, 16, 300, torch.float32)
    h = hidden.clone().requires_grad_()
    linear_topk(h, weight, 6, backend=backend).lse.sum().backward()  # lse only: dz = p
    h64 = hidden.double().requires_grad_()
    (h64 @ weight.double().T).logsumexp(-1).sum().backward()
    assert_close_verbose(h.grad, h64.grad, atol=1e-5, name="d_hidden via lse")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("output", ["logp", "lse"])
def test_backward_precision_at_large_logits(backend, output):
    # issue 9, section 3: |logit| ~ 1.3e4 in fp32; no worse than the fp32 materialised path (see
    # tests/test_linear_logprob.py::test_backward_precision_at_large_logits)
    hidden, weight = large_logit_inputs()
    n, k = hidden.shape[0], 6
    g_logp = torch.randn(n, k) if output == "logp" else torch.zeros(n, k)
    g_lse = torch.randn(n) if output == "lse" else torch.zeros(n)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = linear_topk(h, w, k, backend=backend)
    ((out.logp * g_logp).sum() + (out.lse * g_lse).sum()).backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    r_logp, _, r_lse = linear_gather_ref(h64, w64, out.ids, tail=False, return_lse=True)
    ((r_logp * g_logp.double()).sum() + (r_lse * g_lse.double()).sum()).backward()
    nh, nw = naive_logit_grads(hidden, weight, out.ids, g_logp, g_lse, 1.0, tail=False, log_softmax=True)
    for ours, base, exact, name in [(h.grad, nh, h64.grad, "d_hidden"), (w.grad, nw, w64.grad, "d_weight")]:
        err = (ours.double() - exact).abs().max().item()
        bar = (base.double() - exact).abs().max().item()
        assert err <= 1.5 * bar + 1e-6, f"{name}: ours {err:.3g} vs fp32 materialised {bar:.3g}"


def test_backends_agree_and_ext_override():
    hidden, weight = _inputs(33, 24, 700, torch.float32)
    tops = {b: linear_topk(hidden, weight, 9, backend=b) for b in CPU_BACKENDS}
    for b in CPU_BACKENDS:
        assert torch.equal(tops[b].ids, tops["torch"].ids), b
        assert_close_verbose(tops[b].logp, tops["torch"].logp, atol=1e-5, name=f"{b} topk logp")
    expected = "cpp" if HAS_CPP else "torch"
    assert lt.resolve_backend("auto", torch.device("cpu"), 5) == expected
    with _ext.override_ext(False):
        assert lt.resolve_backend("auto", torch.device("cpu"), 5) == "torch"


# ---- bad input ----


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda h, w, i: linear_topk(h, w, 0), ValueError, r"k must lie in \[1, V=50\]; got k=0"),
        (lambda h, w, i: linear_topk(h, w, 51), ValueError, r"k must lie in \[1, V=50\]; got k=51"),
        (lambda h, w, i: linear_topk(h, w, 2.0), TypeError, "k must be an int"),
        (lambda h, w, i: linear_topk(h[:, :-1], w, 3), ValueError, "share d"),
        (lambda h, w, i: linear_topk(h.double(), w.double(), 3), TypeError, "hidden must be fp32, bf16 or fp16"),
        (lambda h, w, i: linear_topk(h, w.half(), 3), TypeError, "share a dtype"),
        (lambda h, w, i: linear_topk(h, w.to("meta"), 3), ValueError, "one device"),
        (lambda h, w, i: linear_topk(h, w, 3, temperature=-1.0), ValueError, "temperature must be"),
        (lambda h, w, i: linear_topk(h, w, 3, backend="cuda"), ValueError, "backend must be one of"),
        (lambda h, w, i: linear_topk(h.clone().index_fill_(0, torch.tensor([2]), float("nan")), w, 3), ValueError,
         "linear_topk: hidden contains NaN"),
        (lambda h, w, i: linear_topk(h, w.clone().index_fill_(0, torch.tensor([5]), float("inf")), 3), ValueError,
         "linear_topk: weight contains NaN/inf"),
        (lambda h, w, i: linear_topk(h, w[:0], 1), ValueError, "V = 0"),
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
    with pytest.raises(ValueError, match=r"linear_topk: hidden contains NaN/inf \(first at hidden\[3, 1\]"):
        linear_topk(hidden, weight, 4, backend=backend)
    # unchecked: the row comes out NaN, the others are untouched
    out = linear_topk(hidden, weight, 4, backend=backend, check_inputs=False)
    assert torch.isnan(out.lse[3]) and torch.isfinite(out.lse[[0, 1, 2, 4, 5]]).all()


def test_backend_limits():
    hidden, weight = _inputs(6, 8, 300, torch.float32)
    if HAS_TRITON and (INTERPRET or HAS_CUDA):
        with pytest.raises(ValueError, match=r"supports k <= 128; got k=200"):
            linear_topk(hidden.to(TRITON_DEVICE), weight.to(TRITON_DEVICE), 200, backend="triton")
        assert lt.resolve_backend("auto", torch.device("cuda"), 200) == "torch"
    elif not HAS_CUDA:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            linear_topk(hidden, weight, 3, backend="triton")
    # k > TRITON_MAX_K still works on the other backends
    assert linear_topk(hidden, weight, 200, backend="torch").ids.shape == (6, 200)


# ---- torch.library ----


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    hidden, weight = _inputs(9, 16, 300, torch.float32)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    torch.library.opcheck(lt._linear_topk_op, (h, w, 7, 0.9, backend))


def test_torch_compile_fullgraph():
    hidden, weight = _inputs(12, 16, 200, torch.float32)
    teacher = torch.randn(200, 16) / 4
    backend = "cpp" if HAS_CPP else "torch"

    def loss_fn(h, w):
        # a top-k + tail logit-level reverse KL, the shape of SDPO's loss
        student = linear_topk(h, w, 8, backend=backend)
        t = linear_gather(h.detach(), teacher, student.ids, backend=backend)
        s_tail = linear_gather(h, w, student.ids, backend=backend).tail
        s_logp = torch.cat([student.logp, s_tail[:, None]], 1)
        t_logp = torch.cat([t.logp, t.tail[:, None]], 1)
        return (s_logp.exp() * (s_logp - t_logp)).sum() + student.lse.mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    compiled(h1, w1).backward()
    loss_fn(h2, w2).backward()
    assert_close_verbose(h1.grad, h2.grad, atol=1e-6)
    assert_close_verbose(w1.grad, w2.grad, atol=1e-6)


# ---- GPU (skipped without CUDA) ----


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1024, 1536, 151936, 100), (4099, 896, 151937, 20), (333, 4096, 50257, 100)])
def test_gpu_bf16_error_no_worse_than_torch(shape):
    n, d, vocab, k = shape
    hidden, weight = _inputs(n, d, vocab, torch.bfloat16, device="cuda")
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    top = linear_topk(h, w, k, backend="triton")
    gat = linear_gather(h, w, top.ids, backend="triton")
    g_logp, g_tail = torch.randn(n, k, device="cuda"), torch.randn(n, device="cuda")
    ((top.logp * g_logp).sum() + (gat.tail * g_tail).sum()).backward()
    # fp32 oracle from the same bf16 inputs, at our ids
    h32 = hidden.float().requires_grad_()
    w32 = weight.float().requires_grad_()
    r_logp, r_tail = linear_gather_ref(h32, w32, top.ids, chunk_rows=256)
    ((r_logp * g_logp).sum() + (r_tail * g_tail).sum()).backward()
    ref_top = linear_topk_ref(hidden.float(), weight.float(), k, chunk_rows=256)
    # the same-dtype torch path: bf16 matmul, fp32 log_softmax
    logits = (hidden @ weight.T).float()
    naive_top = logits.log_softmax(-1).topk(k, dim=-1).values
    nh, nw = naive_logit_grads(hidden, weight, top.ids, g_logp, g_tail, 1.0, tail=True, log_softmax=True)
    for ours, base, exp, name in [(top.logp, naive_top, ref_top[1], "topk logp (by rank)"),
                                  (gat.tail, None, r_tail, "tail"), (h.grad, nh, h32.grad, "d_hidden"),
                                  (w.grad, nw, w32.grad, "d_weight")]:
        err = (ours.float() - exp).abs().max().item()
        base_err = (base.float() - exp).abs().max().item() if base is not None else 0.0
        assert err <= 2 * base_err + 1e-3, f"{name}: ours {err:.3g} vs torch bf16 {base_err:.3g}"
