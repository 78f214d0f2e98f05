"""Pure-PyTorch oracles, one per op, with the op's signature.

Each is the op's CPU fallback, its test oracle and the "chunked" benchmark peer. They never hold
more than one row chunk of N x V logits at a time. `upcast=True` computes in fp32 whatever the
input dtype (the op's own accumulation); tests call them with fp64 inputs for an exact oracle.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ROWS = 1024


def _row_chunk(n_rows: int, vocab: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        return max(1, chunk_rows)
    # about 256 MiB of fp32 logits per chunk, at least 16 rows
    return max(16, min(DEFAULT_CHUNK_ROWS, (64 << 20) // max(vocab, 1)))


def linear_logprob_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_lse: bool = False,
    upcast: bool = True,
    chunk_rows: int | None = None,
):
    """log softmax(hidden @ weight.T / temperature)[targets], chunked over rows.

    Args:
        hidden: [N, d] (any float dtype).
        weight: [V, d], same dtype.
        targets: [N] int64; rows equal to `ignore_index` give logp 0, entropy 0, lse 0.
        upcast: compute in fp32 (fp64 stays fp64) instead of the input dtype.

    Returns:
        logp [N] (fp32, or fp64 for fp64 input), plus entropy [N] and/or lse [N] when asked, in that
        order. Differentiable through autograd (which then keeps every chunk's logits: tests only).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else (torch.float32 if upcast else hidden.dtype)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = weight.to(compute_dtype)
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
    logps, entropies, lses = [], [], []
    step = _row_chunk(n, vocab, chunk_rows)
    for start in range(0, n, step):
        h = hidden[start : start + step].to(compute_dtype)
        logits = (h @ w.T) / temperature
        logits = logits.to(out_dtype) if compute_dtype != out_dtype else logits
        lse = torch.logsumexp(logits, dim=-1)
        t = safe_targets[start : start + step]
        logps.append(logits.gather(-1, t[:, None]).squeeze(-1) - lse)
        lses.append(lse)
        if return_entropy:
            logp_all = logits - lse[:, None]
            entropies.append(-(logp_all.exp() * logp_all).sum(-1))
    empty = hidden.new_zeros(0, dtype=out_dtype)
    cat = lambda xs: torch.cat(xs) if xs else empty  # noqa: E731
    zero = torch.zeros((), dtype=out_dtype, device=hidden.device)
    outs = [torch.where(keep, cat(logps), zero)]
    if return_entropy:
        outs.append(torch.where(keep, cat(entropies), zero))
    if return_lse:
        outs.append(torch.where(keep, cat(lses), zero))
    return outs[0] if len(outs) == 1 else tuple(outs)


def linear_logprob_bwd_ref(
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    needs_hidden_grad: bool = True,
    needs_weight_grad: bool = True,
    chunk_rows: int | None = None,
):
    """Backward of `linear_logprob` by recomputing each row chunk's logits (never N x V at once).

    With z = h W^T / T, p = softmax(z), log p_y = z_y - lse, H = -sum p log p:
        d logp_y / dz = onehot(y) - p
        d H / dz      = -p * (log p + H) = -p * (z - lse + H)
        d lse / dz    = p
    then d hidden = dz W / T and d weight = dz^T h / T, accumulated in fp32.
    Ignored rows (target == ignore_index) get zero gradient.

    Returns (d_hidden or None, d_weight or None), in the inputs' dtypes.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = weight.to(acc)
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets))

    def _row_grad(g):
        return None if g is None else torch.where(keep, g.to(acc), torch.zeros((), dtype=acc, device=g.device))

    g_logp, g_ent, g_lse = _row_grad(grad_logp), _row_grad(grad_entropy), _row_grad(grad_lse)
    d_hidden = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if needs_hidden_grad else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_weight_grad else None
    step = _row_chunk(n, vocab, chunk_rows)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        h = hidden[rows].to(acc)
        z = (h @ w.T) / temperature
        lse_c = lse[rows].to(acc)[:, None]
        p = torch.exp(z - lse_c)
        dz = torch.zeros_like(z)
        if g_logp is not None:
            dz -= g_logp[rows, None] * p
            dz.scatter_add_(1, safe_targets[rows, None], g_logp[rows, None])
        if g_ent is not None:
            dz -= g_ent[rows, None] * p * (z - lse_c + entropy[rows].to(acc)[:, None])
        if g_lse is not None:
            dz += g_lse[rows, None] * p
        # ignored rows: lse is 0 there, so p may overflow; their gradient is 0 by definition
        dz = torch.where(keep[rows, None], dz / temperature, torch.zeros((), dtype=acc, device=dz.device))
        if d_hidden is not None:
            d_hidden[rows] = dz @ w
        if d_weight is not None:
            d_weight += dz.T @ h
    return (
        None if d_hidden is None else d_hidden.to(hidden.dtype),
        None if d_weight is None else d_weight.to(weight.dtype),
    )


def _topk_smallest_id_first(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Ids [R, k] of the k largest logits per row, by value descending, equal values by smaller id first.

    torch.topk leaves the order among equal values unspecified: rows whose k + 1 largest values hold
    no tie take its answer; the others are recomputed exactly.
    """
    # NaN ranks last (its row's lse is NaN anyway, which the op reports); keeps exactly k per row
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    vals, idx = logits.topk(min(k + 1, logits.shape[-1]), dim=-1)
    tied = (vals[:, 1:] == vals[:, :-1]).any(dim=-1)
    ids = idx[:, :k].clone()
    if bool(tied.any()):
        ids[tied] = _topk_ties_exact(logits[tied], k)
    return ids


def _topk_ties_exact(logits: torch.Tensor, k: int) -> torch.Tensor:
    """_topk_smallest_id_first for rows with ties: topk only fixes the k-th largest value; the ids come
    from an exact count: everything above it, then the smallest ids equal to it."""
    kth = logits.topk(k, dim=-1, sorted=False).values.min(dim=-1, keepdim=True).values
    above = logits > kth
    at = logits == kth  # -0.0 == +0.0, as in the kernels
    need = k - above.sum(dim=-1, keepdim=True)
    take = above | (at & (at.cumsum(dim=-1, dtype=torch.int32) <= need))
    ids = take.nonzero()[:, 1].view(logits.shape[0], k)  # ascending ids, exactly k per row
    order = logits.gather(-1, ids).sort(dim=-1, descending=True, stable=True).indices
    return ids.gather(-1, order)


def linear_topk_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    upcast: bool = True,
    chunk_rows: int | None = None,
):
    """The k most likely tokens of softmax(hidden @ weight.T / temperature), chunked over rows.

    Ties: equal logits are ranked by the smaller token id first (as every backend of `linear_topk`).

    Args:
        hidden: [N, d] (any float dtype).
        weight: [V, d], same dtype; 1 <= k <= V.
        upcast: compute in fp32 (fp64 stays fp64) instead of the input dtype.

    Returns:
        (ids [N, k] int64, logp [N, k], lse [N]), logp and lse fp32 (fp64 for fp64 input); logp sorted
        descending per row. Differentiable through autograd (tests only: it keeps every chunk's logits).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else (torch.float32 if upcast else hidden.dtype)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = weight.to(compute_dtype)
    ids, logps, lses = [], [], []
    step = _row_chunk(n, vocab, chunk_rows)
    for start in range(0, n, step):
        logits = (hidden[start : start + step].to(compute_dtype) @ w.T) / temperature
        logits = logits.to(out_dtype)
        lse = torch.logsumexp(logits, dim=-1)
        top = _topk_smallest_id_first(logits.detach(), k)
        ids.append(top)
        logps.append(logits.gather(-1, top) - lse[:, None])
        lses.append(lse)
    if not ids:
        return (hidden.new_zeros((0, k), dtype=torch.long), hidden.new_zeros((0, k), dtype=out_dtype),
                hidden.new_zeros((0,), dtype=out_dtype))
    return torch.cat(ids), torch.cat(logps), torch.cat(lses)


def linear_gather_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    tail: bool = True,
    return_lse: bool = False,
    upcast: bool = True,
    chunk_rows: int | None = None,
):
    """log softmax(hidden @ weight.T / temperature) at `ids`, plus the tail bucket, chunked over rows.

    The tail is log(1 - sum of p over the distinct ids of the row), computed as logsumexp over the
    vocabulary entries NOT in the row's ids minus the row's logsumexp (no cancellation when the gathered
    mass is ~1). Ids repeated within a row are gathered at each position and counted once in the tail;
    when a row's ids cover the whole vocabulary its tail is -inf (and autograd through it gives NaN: the
    op defines that gradient as 0).

    Args:
        hidden: [N, d] (any float dtype).
        weight: [V, d], same dtype.
        ids: [N, k] int64 in [0, V).
        upcast: compute in fp32 (fp64 stays fp64) instead of the input dtype.

    Returns:
        (logp [N, k], tail [N] or None when tail=False), fp32 (fp64 for fp64 input); with return_lse,
        (logp, tail, lse [N]).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else (torch.float32 if upcast else hidden.dtype)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = weight.to(compute_dtype)
    logps, tails, lses = [], [], []
    step = _row_chunk(n, vocab, chunk_rows)
    for start in range(0, n, step):
        logits = (hidden[start : start + step].to(compute_dtype) @ w.T) / temperature
        logits = logits.to(out_dtype)
        lse = torch.logsumexp(logits, dim=-1)
        rows_ids = ids[start : start + step]
        logps.append(logits.gather(-1, rows_ids) - lse[:, None])
        lses.append(lse)
        if tail:
            gathered = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, rows_ids, True)
            tails.append(torch.logsumexp(logits.masked_fill(gathered, float("-inf")), dim=-1) - lse)
    empty = hidden.new_zeros((0,), dtype=out_dtype)
    logp = torch.cat(logps) if logps else hidden.new_zeros(ids.shape, dtype=out_dtype)
    tails_out = (torch.cat(tails) if tails else empty) if tail else None
    if return_lse:
        return logp, tails_out, torch.cat(lses) if lses else empty
    return logp, tails_out
