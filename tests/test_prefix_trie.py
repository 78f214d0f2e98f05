"""Prefix trie: the compiled builder and its Python twin against an uncompressed-trie oracle.

The oracle inserts every prefix as its own vertex (children in insertion order = first appearance), lays the
vertices out in preorder and starts a new node at every vertex whose parent is a root or has >= 2 children.
That is the contract of credit_kernels/prefix_trie.py computed the slow, obvious way, sharing no code with it.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from credit_kernels import _core
from credit_kernels._ext import HAS_EXT, override_ext
from credit_kernels.prefix_trie import PrefixTrie, build_prefix_trie, gather_sequence_rows, trie_stats

HAS_OP = HAS_EXT and hasattr(torch.ops.credit_C, "build_prefix_trie")
BACKENDS = ["python", pytest.param("cpp", marks=pytest.mark.skipif(not HAS_OP, reason="credit_kernels._C not built"))]
FIELDS = PrefixTrie._fields


# ------------------------------------------------------------------------------------------------ oracle


def trie_oracle(seqs: list[list[int]]) -> dict[str, list[int]]:
    kids: list[dict[int, int]] = [{}]  # vertex -> {token: child vertex}; vertex 0 is the virtual root
    token, depth, parent = [-1], [-1], [-1]
    ends = []  # the vertex path of each sequence
    for seq in seqs:
        v, path = 0, []
        for t in seq:
            if t not in kids[v]:
                kids[v][t] = len(token)
                kids.append({})
                token.append(t), depth.append(depth[v] + 1), parent.append(v)
            v = kids[v][t]
            path.append(v)
        ends.append(path)
    row_of = {}
    out = {f: [] for f in ("tokens", "positions", "token_node", "node_start", "node_end", "node_parent")}
    node_of_vertex = {}
    stack = list(reversed(kids[0].values()))
    while stack:
        v = stack.pop()
        p = parent[v]
        row_of[v] = len(out["tokens"])
        if p == 0 or len(kids[p]) >= 2:  # a new node
            node_of_vertex[v] = len(out["node_start"])
            out["node_start"].append(row_of[v])
            out["node_end"].append(row_of[v])
            out["node_parent"].append(node_of_vertex[p] if p else -1)
        else:
            node_of_vertex[v] = node_of_vertex[p]
        k = node_of_vertex[v]
        out["node_end"][k] += 1
        out["tokens"].append(token[v]), out["positions"].append(depth[v]), out["token_node"].append(k)
        stack.extend(reversed(kids[v].values()))
    # subtree end of each node: the last row of the subtree of its first vertex, + 1
    sub_end = list(out["node_end"])
    for k in reversed(range(len(sub_end))):
        p = out["node_parent"][k]
        if p >= 0:
            sub_end[p] = max(sub_end[p], sub_end[k])
    out["visible_end"] = [sub_end[k] for k in out["token_node"]]
    out["seq_ptr"] = [0]
    out["seq_rows"] = []
    for path in ends:
        out["seq_rows"] += [row_of[v] for v in path]
        out["seq_ptr"].append(len(out["seq_rows"]))
    return out


# ------------------------------------------------------------------------------------------------ inputs


def random_batch(rng: random.Random, *, num_seqs: int, max_len: int, vocab: int) -> list[list[int]]:
    """Heavy sharing: sequences built from a few shared pieces, copies, prefixes, empties and singletons."""
    pieces = [[rng.randrange(vocab) for _ in range(rng.randint(1, max_len))] for _ in range(4)]
    seqs: list[list[int]] = []
    for _ in range(num_seqs):
        kind = rng.random()
        if seqs and kind < 0.15:
            seqs.append(list(rng.choice(seqs)))  # identical to an earlier one
        elif seqs and kind < 0.3:
            src = rng.choice(seqs)
            seqs.append(src[: rng.randint(0, len(src))])  # a prefix of an earlier one
        elif kind < 0.35:
            seqs.append([])
        elif kind < 0.4:
            seqs.append([rng.randrange(vocab)])
        else:  # shared pieces, then a random tail
            seq = []
            for _ in range(rng.randint(1, 3)):
                seq += rng.choice(pieces)[: rng.randint(1, max_len)]
            seq += [rng.randrange(vocab) for _ in range(rng.randint(0, max_len))]
            seqs.append(seq)
    return seqs


CASES = {
    "empty_batch": [],
    "only_empty": [[], []],
    "single_token": [[5]],
    "identical": [[1, 2, 3]] * 4,
    "prefix_then_longer": [[1, 2], [1, 2, 3]],  # extends a leaf: one node, not two
    "longer_then_prefix": [[1, 2, 3], [1, 2]],
    "split_after_extension": [[1, 2], [1, 2, 3, 4], [1, 2, 3, 5], [0], [1, 7]],
    "branch_at_root": [[3], [1], [2], [1, 4]],
    "deep_chain_of_prefixes": [[1, 2, 3, 4, 5, 6][:k] for k in (6, 2, 4, 0, 1, 3, 5)],
    "large_token_ids": [[2**40, 7], [2**40, 8], [2**62]],
}


def as_lists(trie: PrefixTrie) -> dict[str, list[int]]:
    return {f: getattr(trie, f).tolist() for f in FIELDS}


def assert_same_trie(a: PrefixTrie, b: PrefixTrie):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype, f"{f}: dtype {x.dtype} != {y.dtype}"
        assert torch.equal(x, y), f"{f}: {x.tolist()} != {y.tolist()}"


def check_invariants(trie: PrefixTrie, seqs: list[list[int]]):
    """The contract, checked from the outputs alone."""
    dtypes = dict(
        tokens=torch.int64,
        positions=torch.int64,
        token_node=torch.int32,
        visible_end=torch.int32,
        node_start=torch.int32,
        node_end=torch.int32,
        node_parent=torch.int32,
        seq_ptr=torch.int64,
        seq_rows=torch.int64,
    )
    for f, dt in dtypes.items():
        t = getattr(trie, f)
        assert t.dtype == dt and t.dim() == 1 and t.device.type == "cpu", f"{f}: {t.dtype} {tuple(t.shape)}"
    # every sequence reconstructs from its rows, at positions 0..len-1
    assert trie.num_sequences == len(seqs)
    for s, seq in enumerate(seqs):
        rows = gather_sequence_rows(trie, s)
        assert trie.tokens[rows].tolist() == seq
        assert trie.positions[rows].tolist() == list(range(len(seq)))
    # U = number of distinct non-empty prefixes
    prefixes = {tuple(seq[: k + 1]) for seq in seqs for k in range(len(seq))}
    assert trie.num_unique == len(prefixes)
    assert trie.total_tokens == sum(map(len, seqs))
    # nodes tile the rows in preorder; parents come earlier; a node's rows are one run of consecutive positions
    K = trie.num_nodes
    if K:
        assert trie.node_start[0] == 0 and trie.node_end[-1] == trie.num_unique
        assert torch.equal(trie.node_start[1:], trie.node_end[:-1])
        assert bool((trie.node_end > trie.node_start).all())
        assert bool((trie.node_parent < torch.arange(K, dtype=torch.int32)).all())
    for k in range(K):
        a, b = int(trie.node_start[k]), int(trie.node_end[k])
        assert trie.token_node[a:b].tolist() == [k] * (b - a)
        p = int(trie.node_parent[k])
        first_pos = int(trie.positions[a])
        assert first_pos == (0 if p < 0 else int(trie.positions[int(trie.node_end[p]) - 1]) + 1)
        assert trie.positions[a:b].tolist() == list(range(first_pos, first_pos + b - a))
    # path compression: no node has exactly one child (it would have been merged into the run)
    n_children = torch.bincount(trie.node_parent[trie.node_parent >= 0].long(), minlength=K) if K else None
    if K:
        assert not bool((n_children == 1).any()), f"a node with exactly one child: {n_children.tolist()}"
    check_attention_rule(trie)


def check_attention_rule(trie: PrefixTrie):
    """visible_end's rule equals 'j is in i's node at or before i, or in an ancestor node of i's node'."""
    U = trie.num_unique
    if U == 0:
        return
    parent = trie.node_parent.tolist()
    node = trie.token_node.tolist()
    naive = torch.zeros(U, U, dtype=torch.bool)
    for i in range(U):
        naive[i, : i + 1] = torch.tensor([node[j] == node[i] for j in range(i + 1)])
        a = parent[node[i]]
        while a >= 0:
            naive[i, int(trie.node_start[a]) : int(trie.node_end[a])] = True
            a = parent[a]
    i = torch.arange(U)[:, None]
    j = torch.arange(U)[None, :]
    rule = (j <= i) & (i < trie.visible_end[None, :].long())
    assert torch.equal(rule, naive), f"{int((rule != naive).sum())} of {U * U} attention pairs differ"


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_named_cases_match_oracle(case, backend):
    seqs = CASES[case]
    trie = build_prefix_trie(seqs, backend=backend)
    assert as_lists(trie) == trie_oracle(seqs)
    check_invariants(trie, seqs)


def test_layout_of_a_known_batch():
    # roots [1] and [7]; [1] branches into [2 3] and [9]; [2 3] into [4] and [5]; [1 2] ends inside [2 3]
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2], [], [7], [1, 2, 3, 4], [1, 9]]
    trie = build_prefix_trie(seqs, backend="python")
    assert trie.tokens.tolist() == [1, 2, 3, 4, 5, 9, 7]
    assert trie.positions.tolist() == [0, 1, 2, 3, 3, 1, 0]
    assert trie.node_start.tolist() == [0, 1, 3, 4, 5, 6]
    assert trie.node_parent.tolist() == [-1, 0, 1, 1, 0, -1]
    assert trie.visible_end.tolist() == [6, 5, 5, 4, 5, 6, 7]
    assert trie.seq_ptr.tolist() == [0, 4, 8, 10, 10, 11, 15, 17]
    assert gather_sequence_rows(trie, 5).tolist() == [0, 1, 2, 3]  # identical to sequence 0: same rows
    assert gather_sequence_rows(trie, 3).tolist() == []
    assert gather_sequence_rows(trie, -1).tolist() == [0, 5]
    moved = trie.to("cpu")
    assert isinstance(moved, PrefixTrie) and moved.num_unique == 7 and moved.num_nodes == 6
    assert_same_trie(moved, trie)
    assert trie_stats(trie) == {"sequences": 7, "nodes": 6, "unique": 7, "total": 17, "ratio": 7 / 17, "saving": 17 / 7}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("vocab", [2, 50])
def test_random_batches_match_oracle(seed, vocab, backend):
    rng = random.Random(seed)
    seqs = random_batch(rng, num_seqs=rng.randint(1, 40), max_len=rng.choice([3, 30]), vocab=vocab)
    trie = build_prefix_trie(seqs, backend=backend)
    assert as_lists(trie) == trie_oracle(seqs)
    check_invariants(trie, seqs)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.integers(0, 3), max_size=8), max_size=10))
def test_property_python_matches_oracle_and_cpp(seqs):
    trie = build_prefix_trie(seqs, backend="python")
    assert as_lists(trie) == trie_oracle(seqs)
    if HAS_OP:
        assert_same_trie(build_prefix_trie(seqs, backend="cpp"), trie)


@pytest.mark.skipif(not HAS_OP, reason="credit_kernels._C not built")
@pytest.mark.parametrize("seed", range(3))
def test_cpp_matches_python_on_larger_batches(seed):
    # a CREDIT-like batch: shared templates + prompts, shared feedback, unique responses, long runs
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 1000, (int(n),), generator=g) for n in torch.randint(50, 400, (4,), generator=g)]
    feedback = [torch.randint(0, 1000, (int(n),), generator=g) for n in torch.randint(0, 300, (6,), generator=g)]
    seqs = []
    for i in range(300):
        resp = torch.randint(0, 1000, (int(torch.randint(0, 200, (1,), generator=g)),), generator=g)
        seqs.append(torch.cat([prompts[i % 4], feedback[(i // 4) % 6], resp]))
    seqs += seqs[:20] + [s[: len(s) // 2] for s in seqs[20:40]]
    a = build_prefix_trie(seqs, backend="cpp")
    b = build_prefix_trie(seqs, backend="python")
    assert_same_trie(a, b)
    for s in range(0, len(seqs), 17):
        assert torch.equal(a.tokens[gather_sequence_rows(a, s)], seqs[s])
    stats = trie_stats(a)
    assert stats["unique"] < stats["total"] and stats["ratio"] == stats["unique"] / stats["total"]


@pytest.mark.skipif(not HAS_OP, reason="credit_kernels._C not built")
def test_auto_backend_follows_override(monkeypatch):
    import credit_kernels.prefix_trie as mod

    seqs = CASES["split_after_extension"]
    calls = []
    real = mod._build_prefix_trie_python
    monkeypatch.setattr(mod, "_build_prefix_trie_python", lambda *a: calls.append(1) or real(*a))
    with override_ext(False):
        forbidden = build_prefix_trie(seqs)
    assert calls == [1]
    with override_ext(True):
        forced = build_prefix_trie(seqs)
    assert calls == [1]  # the compiled op ran
    assert_same_trie(forbidden, forced)
    # an extension built before csrc/prefix_trie.cpp: "auto" falls back, "cpp" says how to fix it
    monkeypatch.setattr(_core, "has_cpp_op", lambda name: name != "build_prefix_trie")
    assert_same_trie(build_prefix_trie(seqs), forced)
    assert calls == [1, 1]
    with pytest.raises(RuntimeError, match="backend='cpp' needs the compiled extension"):
        build_prefix_trie(seqs, backend="cpp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_kinds_agree(backend):
    seqs = [[4, 5, 6], [4, 5], [], [9]]
    ref = build_prefix_trie(seqs, backend=backend)
    tensors = [torch.tensor(s, dtype=torch.int32) for s in seqs]
    assert_same_trie(build_prefix_trie(tensors, backend=backend), ref)
    assert_same_trie(build_prefix_trie(tuple(tuple(s) for s in seqs), backend=backend), ref)
    empty = torch.zeros(0, dtype=torch.long)
    mixed = [torch.tensor(seqs[0], dtype=torch.uint8), np.array(seqs[1], dtype=np.int16), empty, [np.int32(9)]]
    assert_same_trie(build_prefix_trie(mixed, backend=backend), ref)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_token_names_sequence_and_index(backend):
    with pytest.raises(ValueError, match=r"sequences\[2\]\[1\] = -3"):
        build_prefix_trie([[1], [2, 3], [4, -3, 5]], backend=backend)
    with pytest.raises(ValueError, match=r"sequences\[1\]\[0\] = -1"):
        build_prefix_trie([[], torch.tensor([-1, 2])], backend=backend)


@pytest.mark.parametrize(
    "seqs, match",
    [
        ([[1, 2], [3, 2.5]], r"sequences\[1\]\[1\] must be an int token id; got float"),
        ([[1, "a"]], r"sequences\[0\]\[1\] must be an int token id; got str"),
        ([[True, False]], r"sequences\[0\]\[0\] must be an int token id; got bool"),
        ([torch.tensor([True])], r"sequences\[0\] must hold integer token ids; got dtype torch.bool"),
        ([np.array([0.5])], r"sequences\[0\]\[0\] must be an int token id; got float"),
        ([torch.tensor([1.0, 2.0])], r"sequences\[0\] must hold integer token ids; got dtype torch.float32"),
        ([[1], 5], r"sequences\[1\] must be a list of int token ids or a 1-D integer tensor; got int"),
        ([[1], "abc"], r"sequences\[1\] must be a list .* got str"),
        (torch.tensor([[1, 2], [3, 4]]), r"sequences must be a list of token-id lists .* got Tensor"),
        ("12", r"sequences must be a list of token-id lists .* got str"),
        (None, r"sequences must be a list .* got NoneType"),
    ],
)
def test_non_integer_input_raises_type_error(seqs, match):
    with pytest.raises(TypeError, match=match):
        build_prefix_trie(seqs, backend="python")


def test_other_bad_input():
    with pytest.raises(ValueError, match=r"sequences\[0\] must be 1-D; got shape \(2, 2\)"):
        build_prefix_trie([torch.zeros(2, 2, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"sequences\[1\] must be 1-D; got shape \(2, 1\)"):
        build_prefix_trie([[1], [[1], [2]]])
    with pytest.raises(ValueError, match=r"sequences\[0\] must be 1-D; got shape \(\)"):
        build_prefix_trie([np.array(3)])
    with pytest.raises(ValueError, match=r"sequences\[0\] must be a flat list of int token ids"):
        build_prefix_trie([[[1], [2, 3]]])
    with pytest.raises(ValueError, match=r"token ids in sequences\[1\] must fit in int64"):
        build_prefix_trie([[1], [2**63]])
    with pytest.raises(ValueError, match=r"token ids in sequences\[0\] must fit in int64"):
        build_prefix_trie([[2**70, 1]])
    with pytest.raises(ValueError, match=r"backend must be 'auto', 'cpp' or 'python'; got 'cuda'"):
        build_prefix_trie([[1]], backend="cuda")
    trie = build_prefix_trie([[1, 2], [3]])
    with pytest.raises(ValueError, match=r"s must be in \[-2, 2\) for S = 2; got 2"):
        gather_sequence_rows(trie, 2)
    with pytest.raises(TypeError, match=r"s must be an int sequence index; got float"):
        gather_sequence_rows(trie, 1.0)


@pytest.mark.skipif(not HAS_OP, reason="credit_kernels._C not built")
def test_compiled_op_checks_its_arguments():
    op = torch.ops.credit_C.build_prefix_trie
    flat = torch.tensor([1, 2, 3])
    with pytest.raises(RuntimeError, match="seq_offsets must start at 0 and end at flat_tokens.numel"):
        op(flat, torch.tensor([0, 2]))
    with pytest.raises(RuntimeError, match="seq_offsets must be non-decreasing"):
        op(flat, torch.tensor([0, 2, 1, 3]))
    with pytest.raises(RuntimeError, match="flat_tokens must be int64"):
        op(flat.int(), torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="flat_tokens must be non-negative token ids; found 1 negative"):
        op(torch.tensor([1, -2, 3]), torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="seq_offsets must be 1-D"):
        op(flat, torch.tensor([[0, 3]]))
