"""Vocabulary projections: hidden rows (or logits) -> fp32 log-probs at target ids, or at top-k ids plus the tail.

The tree backend projects the final hidden states of the rows that predict response tokens through the fused
heads of credit_kernels (`linear_logprob`, `linear_gather`: never the N x V logits); the naive backend has the
model's own logits and uses the torch versions here.
"""

from __future__ import annotations

import torch

from credit_kernels import linear_gather, linear_logprob


def head_logprob(hidden, weight, targets, *, temperature: float, check_inputs: bool) -> tuple[torch.Tensor]:
    """(log softmax(hidden @ weight.T / temperature) at targets [n],) through the fused head."""
    return (linear_logprob(hidden, weight, targets, temperature=temperature, check_inputs=check_inputs),)


def head_topk(hidden, weight, ids, *, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [n, k], tail [n]) at `ids` [n, k] through the fused head: the tail is log(1 - sum of the ids' p)."""
    out = linear_gather(hidden, weight, ids, temperature=temperature, tail=True)
    return out.logp, out.tail


def topk_from_logits(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [n, V], ids [n, k] -> (logp [n, k], tail [n]).

    The tail is the logsumexp over the vocabulary entries NOT among the ids, minus the full logsumexp: no
    cancellation when the ids hold almost all the mass (log1p(-sum p) would lose it), -inf when they hold all.
    """
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(1, ids) - lse[:, None]
    rest = logits.scatter(1, ids, float("-inf"))
    return logp, torch.logsumexp(rest, dim=-1) - lse


def logprob_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """fp32 logits [n, V], targets [n] -> log-probs [n]."""
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
