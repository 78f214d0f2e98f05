"""The compiled extension `credit_kernels._C`, optional.

`HAS_EXT` says whether it loaded, `HAS_EXT_CUDA` whether it was built with CUDA kernels. Every
compiled op has a Python twin with identical results; callers ask `use_ext()` which one to run,
and tests flip `override_ext(False)` to run both paths on the same inputs.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

try:
    from credit_kernels import _C  # noqa: F401  (loading it registers torch.ops.credit_C.*)

    HAS_EXT = True
    EXT_ERROR = None
except ImportError as e:  # not built (CREDIT_SKIP_EXT=1, or an install without a compiler)
    HAS_EXT = False
    EXT_ERROR = str(e)

HAS_EXT_CUDA = bool(HAS_EXT and torch.ops.credit_C.has_cuda())

_override: bool | None = None
_warned = False


def use_ext(device: torch.device | str | None = None) -> bool:
    """Whether to run the compiled op for tensors on `device` (CPU unless given)."""
    global _warned
    if _override is False:
        return False
    dev = torch.device(device) if device is not None else torch.device("cpu")
    available = HAS_EXT_CUDA if dev.type == "cuda" else HAS_EXT
    if not HAS_EXT and not _warned:
        _warned = True
        warnings.warn(
            f"credit: compiled extension credit_kernels._C is not available ({EXT_ERROR}); using the Python "
            "fallbacks. Build it with `pip install --no-build-isolation -e .`.",
            stacklevel=3,
        )
    if _override is True and not available:
        raise RuntimeError(f"credit: override_ext(True) but the compiled extension has no {dev.type} kernels")
    return available


@contextlib.contextmanager
def override_ext(enabled: bool | None):
    """Force (True) or forbid (False) the compiled ops inside the block; None restores auto."""
    global _override
    prev, _override = _override, enabled
    try:
        yield
    finally:
        _override = prev
