"""Any layout of any tensor argument gives the contiguous call's result, forward and backward (issue 9, section 1).

One property per op: for each tensor argument and each layout of tests.utils.VIEW_KINDS (strided, sliced, expanded,
transposed, non-zero storage offset), on every backend, the op on the view equals the op on view.contiguous():
bit for bit where only an index tensor changes layout, to fp32 rounding where a float operand does (a matmul may
sum in another order). Gradients too, w.r.t. the view itself.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from credit_kernels import (
    build_prefix_trie,
    credit_reward,
    linear_gather,
    linear_logprob,
    linear_topk,
    tree_attention,
    tree_attention_plan,
)
from credit_kernels._ext import HAS_EXT
from tests.utils import HAS_TRITON, INTERPRET, TRITON_DEVICE, VIEW_KINDS, assert_close_verbose, make_view

CPU_BACKENDS = ["torch"] + (["cpp"] if HAS_EXT else []) + (["triton"] if HAS_TRITON and INTERPRET else [])
HAS_FLEX = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
TREE_BACKENDS = ["torch"] + (["flex"] if HAS_FLEX else []) + (["triton"] if TRITON_DEVICE == "cpu" else [])
TRIE_BACKENDS = ["python"] + (["cpp"] if HAS_EXT else [])


def _params(arg_dims: dict[str, int], backends: list[str], extra_kinds: tuple[str, ...] = ()):
    """(argument, view kind, backend) triples, leaving out layouts the argument's rank does not allow."""
    out = []
    for arg, dim in arg_dims.items():
        for kind in VIEW_KINDS + extra_kinds:
            if kind == "transposed" and dim < 2:
                continue
            out += [pytest.param(arg, kind, b, id=f"{arg}-{kind}-{b}") for b in backends]
    return out


def _upstream(outputs) -> list:
    """A fixed random upstream gradient per float output (the same for the view and the contiguous call)."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(o.shape, generator=gen) if o is not None and o.is_floating_point() else None for o in outputs]


def _run(call, args: dict, grad_args: tuple[str, ...]):
    """outputs of call(args), and d(sum_i <g_i, out_i>) / d args[name] for the float arguments in grad_args."""
    outputs = call(args)
    wrt = [args[n] for n in grad_args if args[n].requires_grad]
    if not wrt:
        return outputs, []
    gs = _upstream(outputs)
    loss = sum((o.masked_fill(~torch.isfinite(o), 0.0) * g).sum() for o, g in zip(outputs, gs) if g is not None)
    return outputs, list(torch.autograd.grad(loss, wrt))


def _check_view(values: dict, arg: str, kind: str, call, grad_args: tuple[str, ...], *, atol=1e-5, rtol=1e-5,
                exact=None):
    """The property itself: call with args[arg] as a `kind` view == call with its contiguous copy.

    exact: demand bit-identical results (default: when args[arg] is an index / mask tensor, whose layout changes
    no arithmetic).
    """
    x = values[arg]
    floating = x.is_floating_point()
    exact = not floating if exact is None else exact

    def args_with(t):
        args = {n: (v.clone().requires_grad_() if v.is_floating_point() and n in grad_args else v.clone())
                for n, v in values.items()}
        args[arg] = t
        return args

    view = make_view(x, kind, requires_grad=floating and arg in grad_args)
    assert view is not None
    contiguous = view.detach().contiguous().requires_grad_(view.requires_grad)
    got, got_grads = _run(call, args_with(view), grad_args)
    expected, expected_grads = _run(call, args_with(contiguous), grad_args)
    for i, (g, e) in enumerate(zip(got, expected)):
        if e is None:
            assert g is None
        elif not exact and e.is_floating_point():
            assert_close_verbose(g, e, atol=atol, rtol=rtol, name=f"output {i}")
        else:  # only an index tensor changed layout: the kernels must compute exactly the same thing
            assert torch.equal(g, e), f"output {i} differs: max |err| {(g.double() - e.double()).abs().max()}"
    assert len(got_grads) == len(expected_grads)
    for i, (g, e) in enumerate(zip(got_grads, expected_grads)):
        assert_close_verbose(g, e, atol=0.0 if exact else atol, rtol=0.0 if exact else rtol, name=f"grad {i}")


# ---------------------------------------------------------------------------------------------------------------------
# linear_logprob, linear_topk, linear_gather
# ---------------------------------------------------------------------------------------------------------------------
N, D, V, K = 6, 16, 300, 5


def _linear_values():
    hidden = torch.randn(N, D)
    weight = torch.randn(V, D) / D**0.5 * 4
    targets = torch.randint(0, V, (N,))
    targets[2] = -100  # an ignored row: the ignore mask must come from the same layout the kernel reads
    ids = torch.randint(0, V, (N, K))
    ids[:, -1] = ids[:, 0]  # a duplicate id per row
    return dict(hidden=hidden, weight=weight, targets=targets, ids=ids)


LINEAR_OPS = {
    "linear_logprob": ({"hidden": 2, "weight": 2, "targets": 1}, lambda b: lambda a: linear_logprob(
        a["hidden"], a["weight"], a["targets"], temperature=0.9, return_entropy=True, return_lse=True, backend=b)),
    "linear_topk": ({"hidden": 2, "weight": 2}, lambda b: lambda a: tuple(linear_topk(
        a["hidden"], a["weight"], K, temperature=1.1, backend=b))),
    "linear_gather": ({"hidden": 2, "weight": 2, "ids": 2}, lambda b: lambda a: tuple(linear_gather(
        a["hidden"], a["weight"], a["ids"], temperature=0.8, backend=b))),
}


@pytest.mark.parametrize("arg, kind, backend", _params(LINEAR_OPS["linear_logprob"][0], CPU_BACKENDS))
def test_linear_logprob_any_layout(arg, kind, backend):
    _check_view(_linear_values(), arg, kind, LINEAR_OPS["linear_logprob"][1](backend), ("hidden", "weight"))


@pytest.mark.parametrize("arg, kind, backend", _params(LINEAR_OPS["linear_topk"][0], CPU_BACKENDS))
def test_linear_topk_any_layout(arg, kind, backend):
    _check_view(_linear_values(), arg, kind, LINEAR_OPS["linear_topk"][1](backend), ("hidden", "weight"))


@pytest.mark.parametrize("arg, kind, backend", _params(LINEAR_OPS["linear_gather"][0], CPU_BACKENDS))
def test_linear_gather_any_layout(arg, kind, backend):
    _check_view(_linear_values(), arg, kind, LINEAR_OPS["linear_gather"][1](backend), ("hidden", "weight"))


def test_scoring_the_last_position_of_a_batch():
    """The case of the issue: hidden[:, -1] and targets[:, -1] of [B, T] tensors, and an expanded target."""
    hidden, weight = torch.randn(5, 7, D), torch.randn(V, D)
    targets = torch.randint(0, V, (5, 7))
    for backend in CPU_BACKENDS:
        got = linear_logprob(hidden[:, -1], weight, targets[:, -1], backend=backend)
        exp = linear_logprob(hidden[:, -1].contiguous(), weight, targets[:, -1].contiguous(), backend=backend)
        assert torch.equal(got, exp), backend
        got = linear_logprob(hidden[:, -1], weight, torch.tensor(5).expand(5), backend=backend)
        exp = linear_logprob(hidden[:, -1].contiguous(), weight, torch.full((5,), 5), backend=backend)
        assert torch.equal(got, exp), backend


# ---------------------------------------------------------------------------------------------------------------------
# credit_reward (no gradient: the rewards are advantages)
# ---------------------------------------------------------------------------------------------------------------------
def _reward_values():
    b, t, m = 4, 37, 3
    mask = torch.rand(b, t) < 0.7
    mask[:, 0] = True
    return dict(aligned=-12 * torch.rand(b, t), shuffled=-12 * torch.rand(m, b, t), student=-12 * torch.rand(b, t),
                mask=mask)


@pytest.mark.parametrize(
    "arg, kind, backend", _params({"aligned": 2, "shuffled": 3, "student": 2, "mask": 2}, CPU_BACKENDS)
)
@pytest.mark.parametrize("baseline", ["mean", "logmeanexp"])
def test_credit_reward_any_layout(arg, kind, backend, baseline):
    def call(a):
        return tuple(credit_reward(a["aligned"], a["shuffled"], a["student"], a["mask"], lam=0.3, baseline=baseline,
                                   backend=backend))

    # the torch backend (the oracle) sums over T in an order that follows the layout of its operands, the mask's
    # too: fp32 rounding of row sums of ~37 terms of |x| <= 12, nothing more; the compiled and Triton kernels read
    # through strides in a fixed order and must be exact
    _check_view(_reward_values(), arg, kind, call, (), atol=1e-4, rtol=1e-6, exact=backend != "torch")


# ---------------------------------------------------------------------------------------------------------------------
# tree_attention and its plan
# ---------------------------------------------------------------------------------------------------------------------
# One root shared by every sequence, so visible_end[0] = U and an expanded visible_end (all U) is a valid trie.
TREE_SEQS = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8], [1, 2, 9], [1, 4, 4, 4, 4], [1, 2, 3, 4, 5, 6, 10, 11, 12]]


def _tree_values():
    trie = build_prefix_trie(TREE_SEQS)
    u = trie.num_unique
    return dict(q=torch.randn(u, 4, 16), k=torch.randn(u, 2, 16), v=torch.randn(u, 2, 16),
                visible_end=trie.visible_end)


def _tree_call(backend):
    def call(a):
        return tuple(tree_attention(a["q"], a["k"], a["v"], SimpleNamespace(visible_end=a["visible_end"]),
                                    scale=0.3, backend=backend))

    return call


def _tree_has_backward(backend) -> bool:
    if backend == "torch":
        return True
    if backend == "flex":  # FlexAttention has no backward on CPU (torch 2.13): "does not support backward on CPU"
        return False
    v = _tree_values()
    q = v["q"].requires_grad_()
    out, _ = tree_attention(q, v["k"], v["v"], SimpleNamespace(visible_end=v["visible_end"]), backend="triton")
    try:
        out.sum().backward()
    except NotImplementedError:  # the forward-only Triton op of today; its backward is tested once it exists
        return False
    return True


@pytest.mark.parametrize("arg, kind, backend", _params({"q": 3, "k": 3, "v": 3, "visible_end": 1}, TREE_BACKENDS))
def test_tree_attention_any_layout(arg, kind, backend):
    grad_args = ("q", "k", "v") if _tree_has_backward(backend) else ()
    _check_view(_tree_values(), arg, kind, _tree_call(backend), grad_args)


@pytest.mark.parametrize("kind", VIEW_KINDS[:1] + tuple(k for k in VIEW_KINDS[1:] if k != "transposed"))
def test_tree_attention_plan_any_layout(kind):
    values = _tree_values()
    view = make_view(values["visible_end"], kind)
    got = tree_attention_plan(SimpleNamespace(visible_end=view))
    exp = tree_attention_plan(SimpleNamespace(visible_end=view.contiguous()))
    for name in ("visible_end", "block_ptr", "block_idx"):
        assert torch.equal(getattr(got, name), getattr(exp, name)), name
        assert getattr(got, name).is_contiguous(), name
    if TRITON_DEVICE == "cpu":
        q, k, v = values["q"], values["k"], values["v"]
        for a, b in zip(tree_attention(q, k, v, got, backend="triton"), tree_attention(q, k, v, exp, backend="triton")):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------------
# build_prefix_trie (token sequences: tensors of any layout, and numpy views)
# ---------------------------------------------------------------------------------------------------------------------
TRIE_SEQS = [[5, 6, 7, 8, 9, 1], [5, 6, 7, 2, 2, 2], [5, 6], [4, 3, 3, 1, 0, 8]]


def _numpy_view(seq: np.ndarray, kind: str) -> np.ndarray:
    if kind == "np_strided":
        base = np.zeros(2 * len(seq), dtype=np.int64)
        base[::2] = seq
        return base[::2]
    if kind == "np_reversed":  # negative stride: torch.from_numpy refuses these
        return np.ascontiguousarray(seq[::-1])[::-1]
    if kind == "np_column":
        base = np.zeros((len(seq), 3), dtype=np.int32)
        base[:, 1] = seq
        return base[:, 1]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", [k for k in VIEW_KINDS if k != "transposed"] + ["np_strided", "np_reversed",
                                                                                   "np_column"])
@pytest.mark.parametrize("backend", TRIE_BACKENDS)
def test_build_prefix_trie_any_layout(kind, backend):
    if kind.startswith("np_"):
        views = [_numpy_view(np.array(s), kind) for s in TRIE_SEQS]
        contiguous = [np.ascontiguousarray(v) for v in views]
    else:
        views = [make_view(torch.tensor(s), kind) for s in TRIE_SEQS]
        contiguous = [v.contiguous() for v in views]
    got = build_prefix_trie(views, backend=backend)
    exp = build_prefix_trie(contiguous, backend=backend)
    for name, a, b in zip(got._fields, got, exp):
        assert torch.equal(a, b), name
