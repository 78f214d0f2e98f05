"""credit.partners: a seeded group-level derangement, checked over many random group layouts."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import credit
from credit import partners


@st.composite
def layouts(draw):
    """(group_ids as a list in shuffled order, M, seed): 2..12 groups of any int ids, unequal sizes 1..5."""
    num_groups = draw(st.integers(2, 12))
    ids = draw(st.lists(st.integers(-(10**6), 10**6), min_size=num_groups, max_size=num_groups, unique=True))
    sizes = draw(st.lists(st.integers(1, 5), min_size=num_groups, max_size=num_groups))
    group_ids = [g for g, n in zip(ids, sizes) for _ in range(n)]
    random.Random(draw(st.integers(0, 2**16))).shuffle(group_ids)
    m = draw(st.integers(1, num_groups - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    return group_ids, m, seed


def _group_table(group_ids: list[int], out: torch.Tensor) -> dict[int, list[int]]:
    table: dict[int, list[int]] = {}
    for g, row in zip(group_ids, out.tolist()):
        assert table.setdefault(g, row) == row, f"responses of group {g} got different partners"
    return table


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_partner_properties(layout):
    group_ids, m, seed = layout
    out = partners(group_ids, num_partners=m, seed=seed)
    assert out.dtype == torch.int64 and out.shape == (len(group_ids), m)
    groups = set(group_ids)
    for g, row in zip(group_ids, out.tolist()):
        assert g not in row, "a response's own group was chosen as its partner"
        assert len(set(row)) == m, f"partners not distinct: {row}"
        assert set(row) <= groups, "partner ids must be existing group ids"
    table = _group_table(group_ids, out)
    # Balanced: each column is a permutation of the groups (a derangement), so every group is a partner exactly
    # once per m, and M times in all.
    for col in range(m):
        assert sorted(row[col] for row in table.values()) == sorted(groups)
    # Deterministic, and a function of the set of groups only: response order and tensor/list input do not matter.
    again = partners(torch.tensor(list(reversed(group_ids))), num_partners=m, seed=seed)
    assert _group_table(list(reversed(group_ids)), again) == table


def test_independent_of_global_rng():
    group_ids = [0, 0, 1, 1, 2, 2, 3, 3, 4]
    torch.manual_seed(1)
    a = partners(group_ids, num_partners=2, seed=7)
    state = torch.get_rng_state()
    torch.manual_seed(12345)
    b = partners(group_ids, num_partners=2, seed=7)
    assert torch.equal(a, b)
    torch.manual_seed(1)
    partners(group_ids, num_partners=2, seed=7)
    assert torch.equal(torch.get_rng_state(), state), "partners must not advance the global RNG"


def test_seed_changes_pairing():
    group_ids = list(range(8))
    outs = {tuple(partners(group_ids, num_partners=1, seed=s).flatten().tolist()) for s in range(10)}
    assert len(outs) > 1, "different seeds should give different derangements"


def test_all_partners_when_m_is_p_minus_1():
    out = partners([5, 9, 9, 2], num_partners=2, seed=3)
    expect = {5: {9, 2}, 9: {5, 2}, 2: {5, 9}}
    for g, row in zip([5, 9, 9, 2], out.tolist()):
        assert set(row) == expect[g]


def test_tensor_input_keeps_device_and_is_top_level():
    assert credit.partners is partners
    gid = torch.tensor([3, 3, 4, 4], dtype=torch.int32)
    out = partners(gid)
    assert out.device == gid.device and out.dtype == torch.int64
    assert out[:, 0].tolist() == [4, 4, 3, 3]


@pytest.mark.parametrize(
    "group_ids, m, match",
    [
        ([1, 1, 1], 1, r"P = 1 prompt.*CREDIT needs partners from other groups; use lam=0 \(SDPO\) or P >= 2"),
        ([1, 2, 3], 0, r"num_partners must be >= 1; got 0"),
        ([1, 2, 3], -1, r"num_partners must be >= 1"),
        ([1, 2, 3], 3, r"num_partners must be <= P - 1 = 2.*got 3"),
        ([1, 1, 2, 2], 2, r"num_partners must be <= P - 1 = 1"),
        ([], 1, r"group_ids is empty"),
    ],
)
def test_impossible_layouts_raise(group_ids, m, match):
    with pytest.raises(ValueError, match=match):
        partners(group_ids, num_partners=m)


@pytest.mark.parametrize(
    "group_ids, match",
    [
        (torch.tensor([0.0, 1.0]), r"group_ids must hold integers; got a tensor of dtype torch.float32"),
        (torch.tensor([True, False]), r"group_ids must hold integers"),
        ([0, 1.5], r"group_ids must hold integers; got float 1.5 at index 1"),
        ("01", r"group_ids must be a \[B\] integer tensor or a list of ints; got str"),
    ],
)
def test_bad_group_ids_type(group_ids, match):
    with pytest.raises(TypeError, match=match):
        partners(group_ids)


def test_bad_group_ids_shape_and_options():
    with pytest.raises(ValueError, match=r"group_ids must have shape \[B\]; got \(2, 2\)"):
        partners(torch.tensor([[0, 1], [1, 0]]))
    with pytest.raises(TypeError, match=r"num_partners must be an int; got float"):
        partners([0, 1], num_partners=1.0)
    with pytest.raises(TypeError, match=r"seed must be an int"):
        partners([0, 1], seed="0")
