"""The shared core of the kernel family: one home for what every op module used to carry its own copy of.

- Triton availability and the interpreter flag (`HAS_TRITON`, `INTERPRET`), the scratch poison switch (`POISON`).
- Backend resolution (`resolve_backend`): "auto" and every explicit backend, with one set of error messages.
- Input validation: the linear family's hidden / weight / index checks, the CREDIT reward validators (shared with
  `credit.rewards` and `credit.losses`), and the finite-output check (`check_finite_outputs`): the ops look at their
  small outputs once and scan the inputs only when something came out non-finite, to name the culprit.
- The input policy every public op applies at its boundary (docs/kernels.md has the user-facing version):
    layout    float operands may have any strides: the Triton kernels take strides (tree attention's wants a unit
              stride on the head dim only: `unit_stride_last`), the compiled and PyTorch paths read through ATen.
              Index operands (targets, ids) become contiguous int64 (`index_operand`): the kernels address them as
              base + row, and the host-side ignore mask must be built from the very tensor the kernel reads.
    autocast  the linear ops cast hidden and weight to the autocast dtype (`autocast_operands`), as F.linear does,
              and every op body runs with autocast off (`no_autocast`), so the kernels compute from the tensors they
              are given: matmul in that dtype, softmax in fp32, fp32 outputs; the casts are differentiable, so the
              gradients come back in each input's own dtype. tree_attention casts q, k, v the same way (as
              scaled_dot_product_attention); credit_reward takes its inputs as given.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
from collections.abc import Callable

import torch

from credit_kernels import _ext

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # CPU-only installs work without Triton
    HAS_TRITON = False

# Decided at import because @triton.jit reads it at decoration time (tests/conftest.py sets it before that).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Tests set this to fill scratch and output buffers with NaN (int64: the largest value), so an element a kernel
# forgets to write shows.
POISON = os.environ.get("CREDIT_POISON") == "1"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BASELINES = ("mean", "logmeanexp")


def scratch(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised buffer; under POISON, NaN (floats) or the largest value (integers) everywhere."""
    if POISON:
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------------------------------
def has_cpp_op(name: str) -> bool:
    """Whether the compiled extension is loaded and has torch.ops.credit_C.<name> (a stale build may lack it)."""
    return _ext.HAS_EXT and hasattr(torch.ops.credit_C, name)


def resolve_backend(
    op: str,
    backend: str,
    device: torch.device | str,
    *,
    choices: tuple[str, ...],
    cpp_op: str | None = None,
    triton_unsupported: str | None = None,
    fallback: str = "torch",
    unavailable: type[Exception] = ValueError,
) -> str:
    """Map "auto" to a concrete backend for tensors on `device`, or check that an explicit one can run there.

    Args:
        op: the public op's name, first word of every message.
        choices: the op's backends, "auto" included. The known ones: "triton" (CUDA, or CPU under
            TRITON_INTERPRET=1), "cuda" (the compiled CUDA kernel), "cpp" (the compiled CPU kernel), and the
            always-available pure-PyTorch ones ("torch", "flex", "python").
        cpp_op: the torch.ops.credit_C op the "cpp" backend calls (checked to exist in this build).
        triton_unsupported: why Triton cannot run this call (e.g. k too large), or None: "auto" then picks
            `fallback`, an explicit "triton" raises with the reason.
        fallback: what "auto" picks when no compiled or Triton backend applies.
        unavailable: the exception for a known backend that cannot run here (ValueError; RuntimeError where an op
            documented that before this module existed).

    "auto": CUDA tensors -> "triton" if installed and supported, else "cuda" if the op has it and the extension
    has CUDA kernels, else `fallback`; CPU tensors -> "cpp" if the op has it and the extension is built (and not
    forbidden by credit_kernels._ext.override_ext(False)), else `fallback`. Auto never picks the interpreter.
    """
    if backend not in choices:
        raise ValueError(f"{op}: backend must be one of {choices}; got {backend!r}")
    dev = torch.device(device)
    if backend == "auto":
        if dev.type == "cuda":
            if "triton" in choices and HAS_TRITON and triton_unsupported is None:
                return "triton"
            if "cuda" in choices and _ext.use_ext(dev):
                return "cuda"
            return fallback
        if "cpp" in choices and dev.type == "cpu" and _ext.use_ext(dev) and (cpp_op is None or has_cpp_op(cpp_op)):
            return "cpp"
        return fallback
    if backend == "triton":
        if not HAS_TRITON:
            raise unavailable(f"{op}: backend='triton' but triton is not installed (pip install triton)")
        if dev.type != "cuda" and not INTERPRET:
            raise unavailable(
                f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported to "
                f"run it on {dev.type} tensors; use backend='auto'"
            )
        if triton_unsupported is not None:
            raise unavailable(f"{op}: backend='triton' {triton_unsupported} (use backend='auto')")
    elif backend == "cpp":
        if dev.type != "cpu":
            raise unavailable(f"{op}: backend='cpp' runs on CPU tensors only; got {dev.type} tensors")
        if not _ext.HAS_EXT or (cpp_op is not None and not has_cpp_op(cpp_op)):
            why = f"is not built ({_ext.EXT_ERROR})" if not _ext.HAS_EXT else f"was built without credit_C.{cpp_op}"
            raise unavailable(
                f"{op}: backend='cpp' needs the compiled extension credit_kernels._C, which {why}; build it with "
                "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`), or use "
                "backend='auto'"
            )
    elif backend == "cuda":
        if dev.type != "cuda":
            raise unavailable(f"{op}: backend='cuda' runs on CUDA tensors only; got {dev.type} tensors (use "
                              "backend='cpp' or 'auto')")
        if not _ext.HAS_EXT_CUDA:
            why = "not built" if not _ext.HAS_EXT else "built without CUDA kernels (CPU-only torch or no nvcc)"
            raise unavailable(
                f"{op}: backend='cuda' but credit_kernels._C is {why}; rebuild with a CUDA torch and nvcc "
                "(CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .) or use "
                "backend='triton'"
            )
    return backend


# ---------------------------------------------------------------------------------------------------------------------
# the input policy: layout and autocast
# ---------------------------------------------------------------------------------------------------------------------
def index_operand(t: torch.Tensor) -> torch.Tensor:
    """An index tensor (targets, ids) as every kernel reads it: int64 and contiguous.

    The Triton kernels address index tensors as base + row (no strides), so a strided, sliced or expanded view
    (stride 0) would be read as garbage or out of bounds; one copy of an [N] or [N, k] integer tensor is cheap.
    """
    return t.long().contiguous()


def unit_stride_last(x: torch.Tensor) -> torch.Tensor:
    """x if its last dim has unit stride (what a kernel that vector-loads rows needs), else a contiguous copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in for `device_type` tensors, or None outside an autocast region."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_operands(*tensors):
    """Under autocast, the float tensors (fp32/bf16/fp16, as autocast's own casts: fp64 stays) in the autocast dtype.

    Applied by the linear ops to hidden and weight and by tree_attention to q, k, v: the same casts F.linear and
    scaled_dot_product_attention get. The casts are differentiable, so gradients come back in each tensor's own
    dtype. Outside autocast (and for non-tensors) everything is returned as given. Unlike autocast's own cast cache,
    each call casts again (a fp32 weight costs a transient copy per call; keep weights in the autocast dtype to
    avoid it).
    """
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    dtype = autocast_dtype(first.device.type) if first is not None else None
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES else t for t in tensors)


def no_autocast(fn: Callable) -> Callable:
    """Run an op body with autocast off for its tensors' device: the kernels compute from the tensors as given.

    Every custom op implementation (forward and backward) is wrapped, so a backward called inside an autocast region,
    or the matmuls inside the compiled and reference paths, never get recast behind the op's back.
    """

    def run(*args, **kwargs):
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if autocast_dtype(dev) is None:
            return fn(*args, **kwargs)
        with torch.autocast(dev, enabled=False):
            return fn(*args, **kwargs)

    functools.update_wrapper(run, fn, updated=())
    # torch.library.custom_op infers the schema from the signature, evaluating string annotations (from
    # `from __future__ import annotations`) in the wrapper's globals: hand it the resolved signature instead.
    del run.__wrapped__
    run.__signature__ = inspect.signature(fn, eval_str=True)
    return run


# ---------------------------------------------------------------------------------------------------------------------
# validation: the linear family (linear_logprob, linear_topk, linear_gather)
# ---------------------------------------------------------------------------------------------------------------------
def check_linear(op: str, hidden, weight, temperature) -> None:
    """hidden [..., d] and weight [V, d]: tensors of one float dtype on one device, V >= 1; temperature > 0."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: hidden and weight must be tensors; got {type(hidden).__name__} and "
                        f"{type(weight).__name__}")
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(
            f"{op}: hidden must be [..., d] and weight [V, d]; got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: hidden [..., d] and weight [V, d] must share d; got d={hidden.shape[-1]} and "
            f"weight {tuple(weight.shape)}"
        )
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be fp32, bf16 or fp16; got {t.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{op}: hidden and weight must share a dtype; got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"{op}: hidden and weight must be on one device; got {hidden.device} and {weight.device}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a finite number > 0; got {temperature!r}")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight has V = 0 rows; the vocabulary must not be empty")


def check_index_tensor(op: str, name: str, x) -> None:
    """An integer tensor (int64 or narrower; not bool)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be an integer tensor; got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must be an integer tensor (int64); got {x.dtype}")


def check_index_range(op: str, name: str, x: torch.Tensor, vocab: int, *, ignore_index: int | None = None) -> None:
    """Every entry in [0, vocab) (or equal to ignore_index). One device sync; the ops skip it when asked."""
    bad = (x < 0) | (x >= vocab)
    if ignore_index is not None:
        bad &= x != ignore_index
    if bool(bad.any()):
        idx = tuple(bad.nonzero()[0].tolist())
        allowed = f"[0, V={vocab})" + (f" or equal ignore_index={ignore_index}" if ignore_index is not None else "")
        raise ValueError(f"{op}: {name} must lie in {allowed}; {name}[{', '.join(map(str, idx))}] = {int(x[idx])}")


def check_finite_outputs(op: str, ok: torch.Tensor, inputs: dict, *, overflow: str, keep=None) -> None:
    """The finite-output check: `ok` (a 0-d bool tensor over the op's small outputs) costs the one device sync; only
    when it is False are `inputs` scanned, to raise a ValueError naming the first one that holds NaN/inf (at a
    position `keep` selects, when given); if none does, the finite inputs overflowed and `overflow` says how."""
    if bool(ok):
        return
    for name, t in inputs.items():
        if keep is not None:
            check_finite(op, name, t, keep)
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            idx = tuple(bad.nonzero()[0].tolist())
            raise ValueError(f"{op}: {name} contains NaN/inf (first at {name}{list(idx)} = {t[idx].item()})")
    raise ValueError(f"{op}: {overflow}")


# ---------------------------------------------------------------------------------------------------------------------
# validation: CREDIT rewards (credit_reward here; credit.rewards and credit.losses import these)
# ---------------------------------------------------------------------------------------------------------------------
def check_float_tensor(fn: str, name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor (log-probs); got dtype {x.dtype}")


def check_mask(fn: str, mask, shape: torch.Size, shape_desc: str) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{fn}: mask must be a torch.Tensor; got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{fn}: mask must be bool or real 0/1 numbers; got dtype {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"{fn}: mask must have shape {shape_desc} = {tuple(shape)}; got {tuple(mask.shape)}")


def check_same_shape(fn: str, name: str, x: torch.Tensor, shape: torch.Size, shape_desc: str) -> None:
    if x.shape != shape:
        raise ValueError(f"{fn}: {name} must have shape {shape_desc} = {tuple(shape)}; got {tuple(x.shape)}")


def check_devices(fn: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        got = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{fn}: all tensors must be on the same device; got {got}")


def check_finite(fn: str, name: str, x: torch.Tensor, keep: torch.Tensor) -> None:
    """Raise if x holds NaN/inf where `keep` (broadcastable bool) is True. Syncs the device once."""
    bad = ~torch.isfinite(x) & keep
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(
            f"{fn}: {name} has {int(bad.sum())} non-finite (NaN/inf) value(s) at unmasked positions, first at "
            f"index {idx} (value {x[tuple(idx)].item()}); pass check_inputs=False to skip this scan"
        )


def check_lam(fn: str, lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"{fn}: lam must be a real number in [0, 1]; got {type(lam).__name__} {lam!r}")
    lam = float(lam)
    if not (0.0 <= lam <= 1.0):  # also rejects NaN
        raise ValueError(
            f"{fn}: lam must be in [0, 1] (0 = SDPO, 1 = pure contrast a - beta); got {lam}. Values outside the "
            "interval extrapolate past the method and are rejected"
        )
    return lam


def check_baseline(fn: str, baseline) -> None:
    if baseline not in BASELINES:
        raise ValueError(f"{fn}: baseline must be one of {BASELINES}; got {baseline!r}")


def check_reward_inputs(fn: str, aligned, shuffled, student, mask) -> None:
    """Shapes: aligned, student, mask [B, T]; shuffled [M, B, T] with M >= 1; one device."""
    check_float_tensor(fn, "aligned", aligned)
    check_float_tensor(fn, "shuffled", shuffled)
    check_float_tensor(fn, "student", student)
    if aligned.dim() != 2:
        raise ValueError(f"{fn}: aligned must have shape [B, T]; got {tuple(aligned.shape)}")
    check_same_shape(fn, "student", student, aligned.shape, "[B, T]")
    check_mask(fn, mask, aligned.shape, "[B, T]")
    if shuffled.dim() != 3 or shuffled.shape[1:] != aligned.shape:
        raise ValueError(
            f"{fn}: shuffled must have shape [M, B, T] = [M, {aligned.shape[0]}, {aligned.shape[1]}] matching "
            f"aligned; got {tuple(shuffled.shape)}"
        )
    if shuffled.shape[0] == 0:
        raise ValueError(
            f"{fn}: shuffled has M = 0 partners; CREDIT needs M >= 1 shuffled teacher passes (use sdpo_rewards for "
            "lam = 0 without partners)"
        )
    check_devices(fn, aligned=aligned, shuffled=shuffled, student=student, mask=mask)
