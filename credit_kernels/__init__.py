"""Fused kernels for CREDIT teacher scoring and updates (see the README and ../shared/DESIGN.md)."""

from credit_kernels._ext import HAS_EXT, HAS_EXT_CUDA
from credit_kernels.linear_logprob import linear_logprob
from credit_kernels.reference import linear_logprob_ref

__all__ = ["HAS_EXT", "HAS_EXT_CUDA", "linear_logprob", "linear_logprob_ref"]
