r"""Partner selection for CREDIT's shuffled teacher passes.

CREDIT (arXiv 2605.11613; see docs/method.md, "Partners") scores every response y_i, sampled for prompt x_g(i), under M teacher
contexts built from the prompts of *other* groups, x_j with j = pi_m(i) != g(i), m = 1..M. The shuffled log-probs
b^m give the input-generic baseline beta that CREDIT subtracts from the aligned teacher's log-probs.

Construction (a seeded group-level derangement): take the P distinct groups in a random cyclic order
sigma (seeded), draw M distinct shifts k_1..k_M from {1, ..., P-1} (seeded), and give group sigma[p] the partners
sigma[(p + k_m) mod P]. Then

* no group is its own partner (k_m != 0 mod P);
* the M partners of a group are distinct (distinct shifts);
* every pi_m is a permutation of the groups, so each group serves as partner exactly M times over the P groups
  (balanced at group level; with unequal group sizes the number of *responses* that see a given partner
  follows the group sizes);
* all responses of a group share the same partners, so their shuffled teacher contexts share prefixes;
* the result depends only on (the set of group ids, M, seed), never on global RNG state.

M must satisfy 1 <= M <= P - 1; P = 1 makes CREDIT impossible and raises (never a silent fallback).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

__all__ = ["partner_draw_seed", "partners"]


def _as_group_tensor(fn: str, group_ids) -> torch.Tensor:
    if isinstance(group_ids, torch.Tensor):
        if group_ids.dtype == torch.bool or group_ids.is_floating_point() or group_ids.is_complex():
            raise TypeError(f"{fn}: group_ids must hold integers; got a tensor of dtype {group_ids.dtype}")
        if group_ids.dim() != 1:
            raise ValueError(f"{fn}: group_ids must have shape [B]; got {tuple(group_ids.shape)}")
        return group_ids
    if isinstance(group_ids, Sequence) and not isinstance(group_ids, (str, bytes)):
        for i, g in enumerate(group_ids):
            if isinstance(g, bool) or not isinstance(g, numbers.Integral):
                raise TypeError(f"{fn}: group_ids must hold integers; got {type(g).__name__} {g!r} at index {i}")
        return torch.tensor([int(g) for g in group_ids], dtype=torch.long)
    raise TypeError(f"{fn}: group_ids must be a [B] integer tensor or a list of ints; got {type(group_ids).__name__}")


def partner_draw_seed(seed: int, step: int) -> int:
    """The seed of step `step`'s partner draw for run seed `seed`: seed * 17 + step. CreditTeacher, the verl and the
    TRL integrations all use it, so one seed gives one global batch the same partners in every trainer."""
    return int(seed) * 17 + int(step)


def partners(group_ids, num_partners: int = 1, seed: int = 0) -> torch.Tensor:
    """Partner group ids for every response: a seeded group-level derangement (see the module docstring).

    Args:
        group_ids: [B] integer tensor or list of ints, the group (prompt) of each response. Any integers, any
            group sizes; P = number of distinct values.
        num_partners: M, partners per response, 1 <= M <= P - 1.
        seed: seed of a private torch.Generator (global RNG state is neither read nor advanced).

    Returns:
        [B, M] int64 tensor of partner *group ids* (values taken from group_ids), on group_ids' device (CPU for a
        list). Row i never contains group_ids[i], its M entries are distinct, and rows of the same group are equal.

    Raises:
        ValueError: P = 1 (CREDIT needs partners from other groups), B = 0, or M outside [1, P - 1].
        TypeError: non-integer group ids, num_partners or seed.
    """
    fn = "partners"
    gid = _as_group_tensor(fn, group_ids)
    for name, v in (("num_partners", num_partners), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{fn}: {name} must be an int; got {type(v).__name__} {v!r}")
    if gid.numel() == 0:
        raise ValueError(f"{fn}: group_ids is empty (B = 0); need responses from P >= 2 groups")
    if num_partners < 1:
        raise ValueError(
            f"{fn}: num_partners must be >= 1; got {num_partners}. M = 0 means no shuffled teacher: use lam=0 (SDPO)"
        )
    # The derangement lives on the host: P is small (prompts per step) and the result must not depend on the device.
    uniq, inverse = torch.unique(gid.cpu(), sorted=True, return_inverse=True)
    num_groups = uniq.numel()
    if num_groups == 1:
        raise ValueError(
            f"{fn}: P = 1 prompt (all {gid.numel()} responses are in group {int(uniq[0])}): CREDIT needs partners "
            "from other groups; use lam=0 (SDPO) or P >= 2"
        )
    if num_partners > num_groups - 1:
        raise ValueError(
            f"{fn}: num_partners must be <= P - 1 = {num_groups - 1} (distinct partners from other groups) with "
            f"P = {num_groups} groups; got {num_partners}"
        )
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    order = torch.randperm(num_groups, generator=gen)  # sigma: position -> group index
    shifts = torch.randperm(num_groups - 1, generator=gen)[:num_partners] + 1  # M distinct shifts in [1, P-1]
    position = torch.empty_like(order)
    position[order] = torch.arange(num_groups)  # group index -> position in sigma
    # partner_idx[g, m] = sigma[(pos(g) + k_m) mod P]
    partner_idx = order[(position[:, None] + shifts[None, :]) % num_groups]  # [P, M]
    return uniq[partner_idx][inverse].to(device=gid.device, dtype=torch.long)  # [B, M] group ids
