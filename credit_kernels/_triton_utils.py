"""Triton helpers of the linear + log-softmax family (linear_logprob, linear_topk, linear_gather).

Device code: the grouped program id, the logit tile, the online logsumexp step. Host code: the fixed configs, the
vocabulary split and the combine of its partials, and the chunked backward (dz chunk, then two matmuls).

Precision contract of the split/combine (issue 9, section 3): every kernel keeps its logits in shifted units. A
row's partials are (max, sum exp(z - max)) per split; `combine_splits` returns the row max m and the log-sum-exp
of the shifted logits, log_norm = log sum exp(z - m), separately. Log-probs are formed as (z - m) - log_norm and
the backward's probabilities as exp((z - m) - log_norm). The fp32 lse = m + log_norm is an output only: at
|z| ~ 1e4 its rounding (half an ulp, ~5e-4) would otherwise scale a whole row of p, which is what made the
backward 3-30x further from fp64 than the materialised path there. z - m is exact for the logits that matter
(Sterbenz: within a factor 2 of m), and log_norm <= log V is small, so its rounding is ~1e-6.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from credit_kernels._core import HAS_TRITON, scratch

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def grouped_pid(pid, num_n_blocks, num_cols, GROUP_N: tl.constexpr):
        """(row block, column) of program `pid`: GROUP_N consecutive row blocks visit the same column (vocabulary
        split or tile) one after the other, so the weight tiles they share stay in L2."""
        pids_per_group = GROUP_N * num_cols
        group = pid // pids_per_group
        first_n = group * GROUP_N
        group_size = tl.minimum(num_n_blocks - first_n, GROUP_N)
        pid_n = first_n + (pid % pids_per_group) % group_size
        pid_col = (pid % pids_per_group) // group_size
        return pid_n, pid_col

    @triton.jit
    def logit_tile(
        hidden_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, D,
        stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """[BLOCK_N, BLOCK_V] fp32 tile of hidden @ weight.T, read through the strides (any layout; int64 offsets:
        V * d can pass 2^31). The forward and backward kernels compute a tile with the same BLOCK_D loop, so the
        backward recomputes the forward's logits (up to the dot unit's order within a BLOCK_D step)."""
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        h_rows = hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hidden_n
        w_rows = weight_ptr + offs_v.to(tl.int64)[:, None] * stride_weight_v
        for k in range(0, D, BLOCK_D):
            offs_d = k + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            h = tl.load(h_rows + offs_d[None, :] * stride_hidden_d, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            w = tl.load(w_rows + offs_d[None, :] * stride_weight_d, mask=mask_v[:, None] & mask_d[None, :], other=0.0)
            if UPCAST_DOT:  # the interpreter's bf16 tl.dot is wrong; upcast there only
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        return acc

    @triton.jit
    def online_lse_step(m_i, s_i, z):
        """One tile of the online logsumexp (Milakov & Gimelshein, arXiv 1805.02867) over the rows of z.

        (m, s) = (running max, sum exp(z - m)) -> (m_new, s_new, alpha, p) with alpha = exp(m - m_new), the
        factor that rescales anything accumulated against the old max, and p = exp(z - m_new). Start from a
        finite m (-1e30) so that alpha stays defined for rows whose tile is all -inf.
        """
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(z - m_new[:, None])
        s_new = s_i * alpha + tl.sum(p, axis=1)
        return m_new, s_new, alpha, p


# ---------------------------------------------------------------------------------------------------------------------
# host side: configs, the vocabulary split and its combine
# ---------------------------------------------------------------------------------------------------------------------
# Launch-config overrides, for sweeps only (bench/sweep_kernels.py): kernel name -> fields that replace the fixed
# config's. Names: "logprob_fwd", "logprob_dz" (linear_logprob), "topk", "gather", "logits_dz" (their backward).
# Empty in normal use, so the fixed configs below are what every user runs.
_OVERRIDES: dict[str, dict] = {}


@contextlib.contextmanager
def override_config(kernel: str, **fields):
    """Within the block, launch `kernel` with `fields` replacing its fixed config (e.g. BLOCK_V=256, num_warps=4)."""
    if kernel not in ("logprob_fwd", "logprob_dz", "topk", "gather", "logits_dz"):
        raise ValueError(f"override_config: unknown kernel {kernel!r}")
    prev = _OVERRIDES.get(kernel)
    _OVERRIDES[kernel] = dict(fields)
    try:
        yield
    finally:
        if prev is None:
            _OVERRIDES.pop(kernel, None)
        else:
            _OVERRIDES[kernel] = prev


def _with_override(cfg: dict, kernel: str) -> dict:
    return {**cfg, **_OVERRIDES[kernel]} if kernel in _OVERRIDES else cfg


def config(device: torch.device, kernel: str = "fwd") -> dict:
    """linear_logprob's launch config for `kernel` ("fwd" or "dz") on `device` (see `_base_config`)."""
    return _with_override(_base_config(device, kernel), "logprob_" + kernel)


def _base_config(device: torch.device, kernel: str = "fwd") -> dict:
    """One fixed config per regime and kernel ("fwd"; "dz", the backward's logit-gradient kernel).

    GPU forward: the best of bench/sweep_logprob.py on an H200 (bf16, N = 16384, d in {1536, 3584}, V = 151936:
    1.22-1.31x cuBLAS's matmul against 1.48-1.53x for 128 x 128 tiles; bench/results/sweep_logprob_NVIDIA_H200.json).
    The dz kernel keeps the 128 x 128 Hopper starting point, not yet swept on a card.
    """
    if device.type != "cuda":  # interpreter: few, large programs (it costs ~ms per loop iteration)
        return dict(BLOCK_N=64, BLOCK_V=1024, BLOCK_D=64, GROUP_N=4, num_warps=4, num_stages=1)
    if kernel == "fwd":
        return dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64, GROUP_N=8, num_warps=8, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, GROUP_N=8, num_warps=8, num_stages=3)


def logits_config(device: torch.device, n: int, kernel: str) -> dict:
    """The config of linear_topk's and linear_gather's kernels ("topk", "gather" forward; "dz" backward): the
    128 x 128 base of `config`, narrowed per kernel."""
    cfg = _base_config(device, "dz")
    if device.type != "cuda":
        # interpreter: its cost is per tile visited, so few rows get wider tiles of the same size
        block_n = min(64, max(16, triton.next_power_of_2(n)))
        cfg.update(BLOCK_N=block_n, BLOCK_V=65536 // block_n)
    elif kernel == "topk":
        # the [BLOCK_N, K_PAD] int64 buffer shares registers with the logit tile. ptxas (Triton 3.8, sm_90,
        # bf16, K_PAD = 128, compiled offline) spills at 64 x 128 x 8 warps (200 B) and not at 64 x 64.
        # Not yet timed on a card.
        cfg.update(BLOCK_N=64, BLOCK_V=64, num_warps=8)
    elif kernel == "gather":
        # same check: 128 x 128 spills 592 B (the walk and the second logsumexp), 64 x 128 none. Not timed.
        cfg.update(BLOCK_N=64, BLOCK_V=128, num_warps=8)
    return _with_override(cfg, "logits_dz" if kernel == "dz" else kernel)


def dot_flags(device: torch.device, dtype: torch.dtype) -> dict:
    return dict(
        UPCAST_DOT=device.type != "cuda",
        # fp32 inputs get full-precision products, not tf32 (this is the accuracy reference dtype)
        INPUT_PRECISION="ieee" if dtype == torch.float32 or device.type != "cuda" else "tf32",
    )


def num_splits(n_blocks: int, v_tiles: int, device: torch.device) -> int:
    """Vocabulary splits per row block: enough programs to fill the card (4 per SM) when rows are few."""
    if device.type != "cuda":
        return min(v_tiles, 3)  # still exercises the cross-split combine under the interpreter
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(v_tiles, math.ceil(4 * sms / n_blocks)))


def split_plan(n: int, vocab: int, cfg: dict, device: torch.device) -> tuple[int, int, int]:
    """(row blocks, tiles per split, splits) for a [n, vocab] logit matrix in cfg's tiles."""
    n_blocks, v_tiles = triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(vocab, cfg["BLOCK_V"])
    tiles_per_split = triton.cdiv(v_tiles, num_splits(n_blocks, v_tiles, device))
    return n_blocks, tiles_per_split, triton.cdiv(v_tiles, tiles_per_split)  # every split holds >= 1 tile


def combine_splits(part_max: torch.Tensor, part_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, S] partials (max, sum exp(z - max)) -> (row_max [N], log_norm [N]) with logsumexp = row_max + log_norm,
    kept apart (see the module docstring); log_norm is -inf where every sum is 0."""
    row_max = part_max.max(dim=1).values
    total = (part_sum * torch.exp(part_max - row_max[:, None])).sum(dim=1)
    return row_max, torch.log(total)


# ---------------------------------------------------------------------------------------------------------------------
# host side: the chunked backward
# ---------------------------------------------------------------------------------------------------------------------
def bwd_chunk_rows(n: int, vocab: int, elt: int) -> int:
    env = os.environ.get("CREDIT_BWD_CHUNK_ROWS")
    if env:
        return max(1, int(env))
    budget = 512 << 20  # bytes of dz per chunk
    if n * vocab * elt <= budget:
        return n
    return max(128, (budget // (vocab * elt)) // 128 * 128)


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with fp32 output from low-precision inputs (cuBLAS out_dtype where torch has it)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        acc += (a @ b).float()


def chunked_linear_backward(hidden, weight, needs_dh: bool, needs_dw: bool, write_dz):
    """d hidden = dz W and d weight = dz^T h, one row chunk of dz at a time (extra memory: chunk x V).

    write_dz(rows: slice, h [rows, d], dz [rows, V]) fills dz (hidden's dtype) with d loss / d (h W^T).
    d weight accumulates in fp32 when there are several chunks. Returns (d_hidden or None, d_weight or None).

    dz is stored in the input dtype (bf16/fp16 for low-precision inputs), the trade the materialised bf16 path
    makes too (its grad_logits is bf16). What it buys: the [chunk, V] buffer takes half the memory and bandwidth of
    fp32, and the two matmuls, the dominant cost of the backward, run as bf16 GEMMs with fp32 accumulation at the
    tensor cores' bf16 rate, where fp32 operands would force the slower fp32/tf32 GEMM paths (not timed here: no
    card). What it costs: one bf16 rounding of every dz entry (2^-9 relative). Measured on the project's 2-core
    CPU under the Triton interpreter (2026-12-01; bf16 inputs, N x d x V = 37 x 31 x 1000 and 64 x 64 x 4096,
    3 seeds each, d loss / d logp random): the Triton gradients' max error vs fp64 is 1.5-3.5x the cpp backend's (which
    keeps dz in fp32: a CPU gains nothing from bf16 GEMMs, so precision is free there) and 0.4-1.9x the
    materialised bf16 path's. So it is the right trade wherever the GEMMs run on tensor cores and the gradients are
    bf16 anyway (their own final rounding is of the same order); a caller who needs tighter bf16 gradients on a
    GPU can pass fp32 hidden/weight (fp32 dz, fp32 GEMMs). fp32 inputs always get an fp32 dz.
    """
    n = hidden.shape[0]
    vocab = weight.shape[0]
    dev = hidden.device
    chunk = bwd_chunk_rows(n, vocab, hidden.element_size())
    dz_buf = scratch((min(chunk, n), vocab), dtype=hidden.dtype, device=dev)
    d_hidden = scratch(hidden.shape, dtype=hidden.dtype, device=dev) if needs_dh else None
    single = chunk >= n
    d_weight = None
    if needs_dw:
        d_weight = (
            scratch(weight.shape, dtype=weight.dtype, device=dev)
            if single
            else torch.zeros(weight.shape, dtype=torch.float32, device=dev)
        )
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        h = hidden[sl]
        dz = dz_buf[: sl.stop - start]
        write_dz(sl, h, dz)
        if needs_dh:
            torch.mm(dz, weight, out=d_hidden[sl])
        if needs_dw:
            if single:
                torch.mm(dz.T, h, out=d_weight)
            else:
                addmm_fp32(d_weight, dz.T, h)
    if needs_dw and not single:
        d_weight = d_weight.to(weight.dtype)
    return d_hidden, d_weight
