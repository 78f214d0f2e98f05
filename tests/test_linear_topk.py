"""linear_topk and linear_gather: every backend against an fp64 oracle, ties, the tail, gradients,
bad input, torch.library."""

import importlib

import pytest
import torch

from credit_kernels import _ext
from credit_kernels.reference import linear_gather_ref, linear_topk_ref
from tests.utils import HAS_CUDA, HAS_TRITON, INTERPRET, TRITON_DEVICE, assert_close_verbose

# the modules, not the functions of the same names that credit_kernels may re-export
ll = importlib.import_module("credit_kernels.linear_logprob")
lt = importlib.import_module("credit_kernels.linear_topk")
lg = importlib.import_module("credit_kernels.linear_gather")
linear_topk, linear_gather = lt.linear_topk, lg.linear_gather

CPU_BACKENDS = (["torch"] + (["cpp"] if lt._has_cpp_ops() else [])
                + (["triton"] if HAS_TRITON and INTERPRET else []))

# (N, d, V, k): odd and aligned; big V only with few rows (the interpreter pays per tile).
SHAPES = [(1, 16, 1000, 1), (37, 31, 1000, 100), (5, 31, 50257, 20), (3, 16, 151937, 5)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # NaN (int64: the largest key) in every scratch buffer, so an element a kernel forgets to write shows
    monkeypatch.setattr(ll, "POISON", True)


def _inputs(n, d, vocab, dtype, *, scale=1.0, device="cpu"):
    hidden = (torch.randn(n, d) * scale).to(dtype).to(device)
    weight = (torch.randn(vocab, d) / d**0.5 * 4).to(dtype).to(device)
    return hidden, weight


def _random_ids(n, vocab, k, *, dupes=True):
    ids = torch.randint(0, vocab, (n, k))
    if dupes and k >= 3:
        ids[:, -1] = ids[:, 0]  # a repeated id in every row
    return ids


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


def _naive_grads(hidden, weight, ids, g_logp, g_row, temperature, tail):
    """Gradients of the same-dtype torch path (matmul in the input dtype, fp32 softmax): the error bar."""
    hn = hidden.clone().requires_grad_()
    wn = weight.clone().requires_grad_()
    logits = (hn @ wn.T).float() / temperature
    lse = logits.logsumexp(-1)
    logp = logits.gather(-1, ids) - lse[:, None]
    if tail:
        rest = logits.masked_fill(torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ids, True), float("-inf"))
        extra = rest.logsumexp(-1) - lse
    else:
        extra = lse
    ((logp * g_logp).sum() + (extra * g_row).sum()).backward()
    return hn.grad, wn.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["topk", "gather"])
@pytest.mark.parametrize(
    "shape, dtype",
    [((37, 31, 1000, 20), torch.float32), ((37, 31, 1000, 20), torch.bfloat16), ((37, 31, 1000, 20), torch.float16),
     ((3, 31, 50257, 7), torch.float32), ((3, 31, 50257, 7), torch.bfloat16)],
)
def test_gradients_random_upstream(backend, op, shape, dtype):
    n, d, vocab, k = shape
    temperature = 1.3 if op == "topk" else 0.8
    hidden, weight = _inputs(n, d, vocab, dtype)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    g_logp, g_row = torch.randn(n, k), torch.randn(n)
    if op == "topk":
        out = linear_topk(h, w, k, temperature=temperature, backend=backend)
        ids, row = out.ids, out.lse
    else:
        ids = _random_ids(n, vocab, k)
        out = linear_gather(h, w, ids, temperature=temperature, backend=backend)
        row = out.tail
    ((out.logp * g_logp).sum() + (row * g_row).sum()).backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype

    # fp64 autograd of the reference, at the same ids (top-k ids are not differentiable)
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    r_logp, r_tail, r_lse = linear_gather_ref(h64, w64, ids, temperature=temperature, return_lse=True)
    r_row = r_lse if op == "topk" else r_tail
    ((r_logp * g_logp.double()).sum() + (r_row * g_row.double()).sum()).backward()
    # the same-dtype torch path sets the bar: at most 2x its error, plus a little
    nh, nw = _naive_grads(hidden, weight, ids, g_logp, g_row, temperature, tail=op == "gather")
    for ours, naive, exact, name in [(h.grad, nh, h64.grad, "d_hidden"), (w.grad, nw, w64.grad, "d_weight")]:
        bar = (naive.double() - exact).abs().max().item()
        assert_close_verbose(ours, exact, atol=2 * bar + 1e-4, name=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_wrt_one_input_and_one_output(backend):
    hidden, weight = _inputs(20, 16, 300, torch.float32)
    h = hidden.clone().requires_grad_()
    linear_topk(h, weight, 6, backend=backend).lse.sum().backward()  # lse only: dz = p
    h64 = hidden.double().requires_grad_()
    (h64 @ weight.double().T).logsumexp(-1).sum().backward()
    assert_close_verbose(h.grad, h64.grad, atol=1e-5, name="d_hidden via lse")
    w = weight.clone().requires_grad_()
    ids = _random_ids(20, 300, 6)
    linear_gather(hidden, w, ids, backend=backend).tail.sum().backward()
    w64 = weight.double().requires_grad_()
    linear_gather_ref(hidden.double(), w64, ids)[1].sum().backward()
    assert_close_verbose(w.grad, w64.grad, atol=1e-5, name="d_weight via tail")


def test_backends_agree_and_ext_override():
    hidden, weight = _inputs(33, 24, 700, torch.float32)
    ids = _random_ids(33, 700, 9)
    tops = {b: linear_topk(hidden, weight, 9, backend=b) for b in CPU_BACKENDS}
    gathers = {b: linear_gather(hidden, weight, ids, backend=b) for b in CPU_BACKENDS}
    for b in CPU_BACKENDS:
        assert torch.equal(tops[b].ids, tops["torch"].ids), b
        assert_close_verbose(tops[b].logp, tops["torch"].logp, atol=1e-5, name=f"{b} topk logp")
        assert_close_verbose(gathers[b].logp, gathers["torch"].logp, atol=1e-5, name=f"{b} gather logp")
        assert_close_verbose(gathers[b].tail, gathers["torch"].tail, atol=1e-5, name=f"{b} tail")
    expected = "cpp" if lt._has_cpp_ops() else "torch"
    assert lt._resolve("auto", torch.device("cpu"), "linear_topk", 5) == expected
    with _ext.override_ext(False):
        assert lt._resolve("auto", torch.device("cpu"), "linear_topk", 5) == "torch"


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
    with pytest.raises(ValueError, match=r"linear_topk: hidden contains NaN/inf \(first at hidden\[3, 1\]"):
        linear_topk(hidden, weight, 4, backend=backend)
    with pytest.raises(ValueError, match=r"linear_gather: hidden contains NaN/inf"):
        linear_gather(hidden, weight, _random_ids(6, 300, 4), backend=backend)
    # unchecked: the row comes out NaN, the others are untouched
    out = linear_topk(hidden, weight, 4, backend=backend, check_inputs=False)
    assert torch.isnan(out.lse[3]) and torch.isfinite(out.lse[[0, 1, 2, 4, 5]]).all()


def test_backend_limits_and_unchecked_nan():
    hidden, weight = _inputs(6, 8, 300, torch.float32)
    if HAS_TRITON and (INTERPRET or HAS_CUDA):
        with pytest.raises(ValueError, match=r"supports k <= 128; got k=200"):
            linear_topk(hidden.to(TRITON_DEVICE), weight.to(TRITON_DEVICE), 200, backend="triton")
        assert lt._resolve("auto", torch.device("cuda"), "linear_topk", 200) == "torch"
    elif not HAS_CUDA:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            linear_topk(hidden, weight, 3, backend="triton")
    # k > TRITON_MAX_K still works on the other backends
    assert linear_topk(hidden, weight, 200, backend="torch").ids.shape == (6, 200)
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
    torch.library.opcheck(lt._linear_topk_op, (h, w, 7, 0.9, backend))
    torch.library.opcheck(lg._linear_gather_op, (h, w, ids, 0.9, True, backend))
    torch.library.opcheck(lg._linear_gather_op, (h, w, ids, 1.0, False, backend))


def test_torch_compile_fullgraph():
    hidden, weight = _inputs(12, 16, 200, torch.float32)
    teacher = torch.randn(200, 16) / 4
    backend = "cpp" if lt._has_cpp_ops() else "torch"

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
    nh, nw = _naive_grads(hidden, weight, top.ids, g_logp, g_tail, 1.0, tail=True)
    for ours, base, exp, name in [(top.logp, naive_top, ref_top[1], "topk logp (by rank)"),
                                  (gat.tail, None, r_tail, "tail"), (h.grad, nh, h32.grad, "d_hidden"),
                                  (w.grad, nw, w32.grad, "d_weight")]:
        err = (ours.float() - exp).abs().max().item()
        base_err = (base.float() - exp).abs().max().item() if base is not None else 0.0
        assert err <= 2 * base_err + 1e-3, f"{name}: ours {err:.3g} vs torch bf16 {base_err:.3g}"
