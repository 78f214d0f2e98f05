"""`credit env`: versions, the card, and which backends are live (a bug report starts here)."""

from __future__ import annotations

import importlib.metadata
import os
import platform


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def env_report() -> dict:
    import torch

    from credit_kernels import _ext
    from credit_kernels.linear_logprob import HAS_TRITON, INTERPRET

    cuda = torch.cuda.is_available()
    report = {
        "credit": _version("credit"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "liger-kernel": _version("liger-kernel"),
        "cut-cross-entropy": _version("cut-cross-entropy"),
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
        "backends": {
            "C++ extension (credit_kernels._C)": "yes" if _ext.HAS_EXT else f"no ({_ext.EXT_ERROR})",
            "CUDA extension": "yes" if _ext.HAS_EXT_CUDA else "no",
            "Triton on GPU": "yes" if (HAS_TRITON and cuda) else "no",
            "Triton interpreter (TRITON_INTERPRET=1)": "yes" if (HAS_TRITON and INTERPRET) else "no",
            "PyTorch reference": "yes",
        },
        "code sandbox": _sandbox(),
    }
    return report


def _sandbox() -> str:
    """Which isolation layers the code environment gets on this machine (runs one tiny sandboxed program)."""
    try:
        from credit.envs.sandbox import sandbox_report

        info = sandbox_report()
        return f"{', '.join(info['layers'])} (python {info['python']})"
    except Exception as e:  # the report must never fail because of the sandbox
        return f"unavailable ({type(e).__name__}: {e})"


def format_report(report: dict) -> str:
    lines = []
    for key, value in report.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k:<42} {v}" for k, v in value.items()]
        else:
            lines.append(f"{key:<20} {value}")
    return "\n".join(lines)


def main() -> None:
    print(format_report(env_report()))


if __name__ == "__main__":
    main()
