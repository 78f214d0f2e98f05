"""Pure-PyTorch oracles, one per op, with the op's signature.

Each is the op's CPU fallback (backend="torch"), its test oracle and the "chunked" benchmark peer:
linear_logprob_ref, linear_topk_ref, linear_gather_ref, credit_reward_ref (tree_attention_ref lives with its op).
The linear ones never hold more than one row chunk of N x V logits at a time. `upcast=True` computes in fp32
whatever the input dtype (the op's own accumulation); tests call them with fp64 inputs for an exact oracle.

The `*_fwd_ref` / `*_bwd_ref` functions are the same computations in the form the custom ops' torch backend needs
(the forward also returns the row max and the log-sum-exp of the shifted logits that the backward uses; see
credit_kernels/_triton_utils.py for why those two stay apart).
"""

from __future__ import annotations

import math

import torch

DEFAULT_CHUNK_ROWS = 1024


def _row_chunk(n_rows: int, vocab: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        return max(1, chunk_rows)
    # about 256 MiB of fp32 logits per chunk, at least 16 rows
    return max(16, min(DEFAULT_CHUNK_ROWS, (64 << 20) // max(vocab, 1)))


def _lse_parts(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_max, log_norm) of [R, V] logits: logsumexp = row_max + log_norm, log_norm = log sum exp(z - row_max).

    torch.logsumexp's convention for the shift: an infinite max shifts by 0 (so inf - inf never happens); NaN
    propagates. The shift is a constant for autograd (the result does not depend on it): gradients are exactly
    onehot - p and p, with no (1 - sum p) residue routed through the argmax.
    """
    row_max = logits.detach().amax(dim=-1)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    return row_max, torch.log(torch.exp(logits - row_max[:, None]).sum(dim=-1))


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
    logp, entropy, lse, _, _ = linear_logprob_fwd_ref(
        hidden, weight, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
        upcast=upcast, chunk_rows=chunk_rows,
    )
    outs = [logp] + ([entropy] if return_entropy else []) + ([lse] if return_lse else [])
    return outs[0] if len(outs) == 1 else tuple(outs)


def linear_logprob_fwd_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    upcast: bool = True,
    chunk_rows: int | None = None,
):
    """linear_logprob_ref's computation, all of it: (logp, entropy or None, lse, row_max, log_norm), each [N].

    Log-probs in shifted units: logp = (z_y - row_max) - log_norm, never z_y - lse (whose rounding at |z| ~ 1e4
    would shift every log-prob of the row). Ignored rows are 0 in all five.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else (torch.float32 if upcast else hidden.dtype)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = weight.to(compute_dtype)
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
    parts = {name: [] for name in ("logp", "entropy", "row_max", "log_norm")}
    step = _row_chunk(n, vocab, chunk_rows)
    for start in range(0, n, step):
        h = hidden[start : start + step].to(compute_dtype)
        logits = (h @ w.T) / temperature
        logits = logits.to(out_dtype) if compute_dtype != out_dtype else logits
        row_max, log_norm = _lse_parts(logits)
        t = safe_targets[start : start + step]
        parts["logp"].append((logits.gather(-1, t[:, None]).squeeze(-1) - row_max) - log_norm)
        parts["row_max"].append(row_max)
        parts["log_norm"].append(log_norm)
        if return_entropy:
            logp_all = (logits - row_max[:, None]) - log_norm[:, None]
            parts["entropy"].append(-(logp_all.exp() * logp_all).sum(-1))
    empty = hidden.new_zeros(0, dtype=out_dtype)
    zero = torch.zeros((), dtype=out_dtype, device=hidden.device)

    def cat(name):
        return torch.where(keep, torch.cat(parts[name]) if parts[name] else empty, zero)

    row_max, log_norm = cat("row_max"), cat("log_norm")
    return cat("logp"), cat("entropy") if return_entropy else None, row_max + log_norm, row_max, log_norm


def linear_logprob_bwd_ref(
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    log_norm: torch.Tensor,
    entropy: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    needs_hidden_grad: bool = True,
    needs_weight_grad: bool = True,
    chunk_rows: int | None = None,
):
    """Backward of `linear_logprob` by recomputing each row chunk's logits (never N x V at once).

    With z = h W^T / T, log p = (z - row_max) - log_norm (the forward's two row statistics), p = exp(log p),
    H = -sum p log p:
        d logp_y / dz = onehot(y) - p
        d H / dz      = -p * (log p + H)
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
        log_p = (z - row_max[rows].to(acc)[:, None]) - log_norm[rows].to(acc)[:, None]
        p = torch.exp(log_p)
        dz = torch.zeros_like(z)
        if g_logp is not None:
            dz -= g_logp[rows, None] * p
            dz.scatter_add_(1, safe_targets[rows, None], g_logp[rows, None])
        if g_ent is not None:
            dz -= g_ent[rows, None] * p * (log_p + entropy[rows].to(acc)[:, None])
        if g_lse is not None:
            dz += g_lse[rows, None] * p
        # ignored rows: their row statistics are 0, so p may overflow; their gradient is 0 by definition
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
    return linear_topk_fwd_ref(hidden, weight, k, temperature=temperature, upcast=upcast, chunk_rows=chunk_rows)[:3]


def linear_topk_fwd_ref(hidden, weight, k, *, temperature=1.0, upcast=True, chunk_rows=None):
    """linear_topk_ref's computation plus the row statistics: (ids, logp, lse, row_max, log_norm)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else (torch.float32 if upcast else hidden.dtype)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = weight.to(compute_dtype)
    ids, logps, maxes, norms = [], [], [], []
    step = _row_chunk(n, vocab, chunk_rows)
    for start in range(0, n, step):
        logits = (hidden[start : start + step].to(compute_dtype) @ w.T) / temperature
        logits = logits.to(out_dtype)
        row_max, log_norm = _lse_parts(logits)
        top = _topk_smallest_id_first(logits.detach(), k)
        ids.append(top)
        logps.append((logits.gather(-1, top) - row_max[:, None]) - log_norm[:, None])
        maxes.append(row_max)
        norms.append(log_norm)
    if not ids:
        empty = hidden.new_zeros((0,), dtype=out_dtype)
        return (hidden.new_zeros((0, k), dtype=torch.long), hidden.new_zeros((0, k), dtype=out_dtype), empty,
                empty.clone(), empty.clone())
    row_max, log_norm = torch.cat(maxes), torch.cat(norms)
    return torch.cat(ids), torch.cat(logps), row_max + log_norm, row_max, log_norm


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
    logp, tails, lse, _, _ = linear_gather_fwd_ref(hidden, weight, ids, temperature=temperature, tail=tail,
                                                   upcast=upcast, chunk_rows=chunk_rows)
    return (logp, tails, lse) if return_lse else (logp, tails)


def linear_gather_fwd_ref(hidden, weight, ids, *, temperature=1.0, tail=True, upcast=True, chunk_rows=None):
    """linear_gather_ref's computation plus the row statistics: (logp, tail or None, lse, row_max, log_norm).

    In shifted units throughout: logp = (z - row_max) - log_norm and tail = ((rest_max - row_max) + rest_norm) -
    log_norm, where (rest_max, rest_norm) are the two statistics of the non-gathered logits.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else (torch.float32 if upcast else hidden.dtype)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = weight.to(compute_dtype)
    logps, tails, maxes, norms = [], [], [], []
    step = _row_chunk(n, vocab, chunk_rows)
    for start in range(0, n, step):
        logits = (hidden[start : start + step].to(compute_dtype) @ w.T) / temperature
        logits = logits.to(out_dtype)
        row_max, log_norm = _lse_parts(logits)
        rows_ids = ids[start : start + step]
        logps.append((logits.gather(-1, rows_ids) - row_max[:, None]) - log_norm[:, None])
        maxes.append(row_max)
        norms.append(log_norm)
        if tail:
            gathered = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, rows_ids, True)
            rest_max, rest_norm = _lse_parts(logits.masked_fill(gathered, float("-inf")))
            tails.append(((rest_max - row_max) + rest_norm) - log_norm)
    empty = hidden.new_zeros((0,), dtype=out_dtype)
    logp = torch.cat(logps) if logps else hidden.new_zeros(ids.shape, dtype=out_dtype)
    tails_out = (torch.cat(tails) if tails else empty) if tail else None
    row_max = torch.cat(maxes) if maxes else empty
    log_norm = torch.cat(norms) if norms else empty.clone()
    return logp, tails_out, row_max + log_norm, row_max, log_norm


def linear_logits_bwd_ref(
    hidden, weight, ids, fix, row_max, log_norm, coef, rest_shift, coef_rest, *, temperature=1.0,
    needs_hidden_grad=True, needs_weight_grad=True, chunk_rows=None,
):
    """Backward of linear_topk and linear_gather (op credit::linear_logits_backward), chunked in fp32 (fp64 for
    fp64 inputs): (d_hidden or None, d_weight or None) in the inputs' dtypes.

    With z = hidden @ weight.T / T and log p = (z - row_max) - log_norm, the gradient w.r.t. the logits is
        dz[i, v] = coef[i] p[i, v] + coef_rest[i] exp(min((z - row_max) - rest_shift, 0))   for v not in ids[i]
        dz[i, v] = fix[i, j]                                                                  for v = ids[i, j]
    (all over T), rest_shift = lse_rest - row_max of the tail's logsumexp (+inf: no tail gradient). The rest
    terms are optional (None).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = weight.to(acc)
    d_hidden = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if needs_hidden_grad else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_weight_grad else None
    step = _row_chunk(n, vocab, chunk_rows)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        h = hidden[rows].to(acc)
        shifted = (h @ w.T) / temperature - row_max[rows, None].to(acc)
        dz = coef[rows, None].to(acc) * torch.exp(shifted - log_norm[rows, None].to(acc))
        if rest_shift is not None:
            dz += coef_rest[rows, None].to(acc) * torch.exp((shifted - rest_shift[rows, None].to(acc)).clamp(max=0.0))
        dz.scatter_(1, ids[rows], fix[rows].to(acc))
        dz /= temperature
        if d_hidden is not None:
            d_hidden[rows] = dz @ w
        if d_weight is not None:
            d_weight += dz.T @ h
    return (
        None if d_hidden is None else d_hidden.to(hidden.dtype),
        None if d_weight is None else d_weight.to(weight.dtype),
    )


# ---------------------------------------------------------------------------------------------------------------------
# CREDIT rewards (the oracle of credit_kernels.credit_reward; credit.rewards calls it after validating)
# ---------------------------------------------------------------------------------------------------------------------
def keep_mask(mask: torch.Tensor) -> torch.Tensor:
    """Masks are bool or 0/1 numbers: any non-zero entry counts as 1."""
    return mask if mask.dtype == torch.bool else mask != 0


def partner_baseline(b: torch.Tensor, baseline: str) -> torch.Tensor:
    """beta over the leading (M) dim of fp32 `b`: "mean" is b.sum(0) / M, "logmeanexp" logsumexp(b, 0) - log M."""
    num = b.shape[0]
    if baseline == "mean":
        return b.sum(0) / num
    return torch.logsumexp(b, 0) - math.log(num)


def credit_token_rewards_ref(aligned, shuffled, student, mask, *, lam: float = 0.5, baseline: str = "mean"):
    """CREDIT token rewards r = (a - s) - lam * (beta - s), exactly +0.0 where the mask is 0: [B, T] fp32.

    The conventions every backend of credit_reward follows: inputs cast to fp32 and fp32 math; masking by selection
    (torch.where), so NaN/inf at masked positions never leak; beta as `partner_baseline`; r in this operation order.
    """
    keep = keep_mask(mask)
    a, s = aligned.float(), student.float()
    beta = partner_baseline(shuffled.float(), baseline)
    r = (a - s) - lam * (beta - s)
    return torch.where(keep, r, torch.zeros((), dtype=torch.float32, device=r.device))


def sequence_pmi_ref(aligned, shuffled, student, mask):
    """(pmi, contrastive_pmi, contrastive_pmi_surrogate), each [B] fp32; sums over the masked fp32 values of T.

        pmi = sum_t m (a - s);  contrastive = A - (logsumexp_m B_m - log M), A = sum_t m a, B_m = sum_t m b^m;
        surrogate = sum_t m (a - mean_m b^m)
    """
    keep = keep_mask(mask)
    zero = torch.zeros((), dtype=torch.float32, device=aligned.device)
    a = torch.where(keep, aligned.float(), zero)
    s = torch.where(keep, student.float(), zero)
    b = torch.where(keep, shuffled.float(), zero)  # keep [B, T] broadcasts over M
    num = shuffled.shape[0]
    a_sum = a.sum(-1)  # [B]
    b_sum = b.sum(-1)  # [M, B]
    pmi = (a - s).sum(-1)
    contrastive = a_sum - (torch.logsumexp(b_sum, 0) - math.log(num))
    surrogate = (a - b.sum(0) / num).sum(-1)
    return pmi, contrastive, surrogate


def credit_reward_ref(aligned, shuffled, student, mask, *, lam: float = 0.5, baseline: str = "mean"):
    """The oracle of credit_kernels.credit_reward, same signature (no validation, no NaN scan: callers do that).

    Args:
        aligned: [B, T] float, a; shuffled: [M, B, T] float, b^m (M >= 1); student: [B, T] float, s;
        mask: [B, T] bool or real (any non-zero entry counts as 1); lam in [0, 1]; baseline "mean" | "logmeanexp".

    Returns:
        (rewards [B, T], pmi [B], contrastive_pmi [B], contrastive_pmi_surrogate [B]), all fp32; see
        credit_token_rewards_ref and sequence_pmi_ref.
    """
    rewards = credit_token_rewards_ref(aligned, shuffled, student, mask, lam=lam, baseline=baseline)
    return (rewards, *sequence_pmi_ref(aligned, shuffled, student, mask))
