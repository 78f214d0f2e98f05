"""Prefix trie over a batch of token sequences: compute each shared prefix once.

CREDIT scores every response under its own teacher context and M shuffled ones (the method's "why this is a kernel
problem"); those sequences share long prefixes (template + prompt, the same sibling solution across
a group). `build_prefix_trie` packs the unique tokens of a batch into one buffer that a single forward pass with
`tree_attention` can run, and maps every input position back to its packed row.

The format (the contract between this builder, tree attention and the teacher scorer):

    tokens      [U] int64   packed unique tokens; nodes laid out contiguously in DFS PREORDER
    positions   [U] int64   depth of each packed token in its sequence (0-based) -> position ids
    token_node  [U] int32   node id of each packed token
    visible_end [U] int32   one past the last packed row of the SUBTREE of the token's node
    node_start  [K] int32   first packed row of each node (nodes numbered in preorder)
    node_end    [K] int32   one past its last row
    node_parent [K] int32   parent node id, -1 for a root
    seq_ptr     [S+1] int64 CSR: the packed rows of sequence s are seq_rows[seq_ptr[s]:seq_ptr[s+1]]
    seq_rows    [sum len] int64, one row per position of each input sequence, in order

Path-compressed: a node is a maximal unbranched run of tokens. Edges split only where sequences diverge; a
sequence that ends inside a run does not split it (its rows are a prefix of the run). Identical sequences map
to the same rows; an empty sequence has no rows. Children are ordered by first appearance in the input list
(the earliest sequence that passes through them), so the layout is a pure function of the input list.

Attention rule of the preorder layout: packed query row i may attend to packed key row j iff

    j <= i  and  i < visible_end[j]

(j in an ancestor node of i's node: i lies in that node's subtree; j in i's own node: causal). Every node's
subtree is the contiguous row range [node_start[k], visible_end[node_start[k]]).

Backends: the compiled op `torch.ops.credit_C.build_prefix_trie` (csrc/prefix_trie.cpp) and the Python twin
`_build_prefix_trie_python` below run the same algorithm and return identical tensors (tests/test_prefix_trie.py
checks both against an uncompressed-trie oracle). The trie is host-side: outputs are CPU tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch

from credit_kernels import _core

__all__ = ["PrefixTrie", "build_prefix_trie", "gather_sequence_rows", "trie_stats"]


class PrefixTrie(NamedTuple):
    """Packed, path-compressed prefix trie of a batch of sequences (see the module docstring for the contract).

    U = unique tokens, K = nodes, S = input sequences. `build_prefix_trie` returns CPU tensors; `.to(device)` moves
    them all.
    """

    tokens: torch.Tensor  # [U] int64
    positions: torch.Tensor  # [U] int64
    token_node: torch.Tensor  # [U] int32
    visible_end: torch.Tensor  # [U] int32
    node_start: torch.Tensor  # [K] int32
    node_end: torch.Tensor  # [K] int32
    node_parent: torch.Tensor  # [K] int32
    seq_ptr: torch.Tensor  # [S+1] int64
    seq_rows: torch.Tensor  # [sum len] int64

    @property
    def num_unique(self) -> int:
        """U: packed unique tokens (= the number of distinct non-empty prefixes of the inputs)."""
        return self.tokens.numel()

    @property
    def num_nodes(self) -> int:
        """K: nodes of the compressed trie."""
        return self.node_start.numel()

    @property
    def num_sequences(self) -> int:
        """S: input sequences (empty ones included)."""
        return self.seq_ptr.numel() - 1

    @property
    def total_tokens(self) -> int:
        """Sum of the input sequences' lengths: the tokens a forward without sharing would run."""
        return self.seq_rows.numel()

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> PrefixTrie:
        """The same trie with every tensor on `device` (e.g. for tree attention on the GPU)."""
        return PrefixTrie(*(t.to(device, non_blocking=non_blocking) for t in self))


# --------------------------------------------------------------------------------------------------------------
# Input validation: list of token-id lists / 1-D integer tensors -> (flat int64 [T], offsets int64 [S+1])
# --------------------------------------------------------------------------------------------------------------

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32)


def _first_non_int(seq, s: int) -> TypeError | None:
    for j, x in enumerate(seq):
        if isinstance(x, bool) or not isinstance(x, int | np.integer):
            return TypeError(
                f"build_prefix_trie: sequences[{s}][{j}] must be an int token id; got {type(x).__name__} {x!r}"
            )
    return None


def _as_token_tensor(seq, s: int) -> torch.Tensor:
    """One sequence as a 1-D int64 CPU tensor, or TypeError / ValueError naming `sequences[s]`."""
    if isinstance(seq, torch.Tensor):
        t = seq
        if t.dtype not in _INT_DTYPES:
            raise TypeError(f"build_prefix_trie: sequences[{s}] must hold integer token ids; got dtype {t.dtype}")
    else:
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence | np.ndarray):
            raise TypeError(
                f"build_prefix_trie: sequences[{s}] must be a list of int token ids or a 1-D integer tensor; "
                f"got {type(seq).__name__}"
            )
        if isinstance(seq, np.ndarray) and seq.ndim != 1:
            raise ValueError(f"build_prefix_trie: sequences[{s}] must be 1-D; got shape {seq.shape}")
        if len(seq) == 0:
            return torch.zeros(0, dtype=torch.int64)
        # numpy infers the dtype 4x faster than torch.as_tensor converts a list of ints, and never casts
        # silently: floats give float64, bools bool, strings a string dtype, ints past int64 object/uint64.
        try:
            a = np.asarray(seq)
        except (TypeError, ValueError) as e:  # ragged nesting
            raise ValueError(f"build_prefix_trie: sequences[{s}] must be a flat list of int token ids: {e}") from None
        if a.dtype.kind not in "iu" or (a.dtype == np.uint64 and a.ndim == 1 and int(a.max()) >= 2**63):
            err = _first_non_int(seq, s) if a.ndim == 1 else None
            if err is not None:
                raise err
            if a.dtype.kind in "uO":  # Python ints that do not fit in int64
                raise ValueError(f"build_prefix_trie: token ids in sequences[{s}] must fit in int64")
            raise TypeError(f"build_prefix_trie: sequences[{s}] must hold integer token ids; got dtype {a.dtype}")
        # torch.from_numpy refuses negative strides (a reversed view) and warns on read-only arrays: copy those
        a = a.astype(np.int64, copy=False)
        if not a.flags.writeable or any(st < 0 for st in a.strides):
            a = a.copy()
        t = torch.from_numpy(a)
    if t.dim() != 1:
        raise ValueError(f"build_prefix_trie: sequences[{s}] must be 1-D; got shape {tuple(t.shape)}")
    return t.to(device="cpu", dtype=torch.int64)


def _flatten_sequences(sequences) -> tuple[torch.Tensor, torch.Tensor]:
    if (
        isinstance(sequences, torch.Tensor)
        or isinstance(sequences, (str, bytes))
        or not isinstance(sequences, Sequence)
    ):
        raise TypeError(
            "build_prefix_trie: sequences must be a list of token-id lists or of 1-D integer tensors "
            f"(for a padded 2-D tensor pass a list of its unpadded rows); got {type(sequences).__name__}"
        )
    parts = [_as_token_tensor(seq, s) for s, seq in enumerate(sequences)]
    lengths = torch.tensor([p.numel() for p in parts], dtype=torch.int64)
    offsets = torch.zeros(len(parts) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    if flat.numel() and int(flat.min()) < 0:  # one reduction; locate the culprit only on the error path
        i = int((flat < 0).nonzero()[0, 0])
        s = int(torch.searchsorted(offsets, i, right=True)) - 1
        raise ValueError(
            f"build_prefix_trie: token ids in sequences must be >= 0; sequences[{s}][{i - int(offsets[s])}] = "
            f"{int(flat[i])}"
        )
    return flat, offsets


# --------------------------------------------------------------------------------------------------------------
# Python twin of csrc/prefix_trie.cpp (same algorithm, identical output; see that file's header for the rules)
# --------------------------------------------------------------------------------------------------------------


def _common_prefix(tok: np.ndarray, a: int, b: int, n: int) -> int:
    """Length of the common prefix of tok[a:a+n] and tok[b:b+n]."""
    neq = tok[a : a + n] != tok[b : b + n]
    k = int(neq.argmax())
    return k if neq[k] else n


def _build_prefix_trie_python(flat: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    tok = flat.numpy()
    off = offsets.tolist()
    num_seqs = len(off) - 1
    # 1. Radix-tree insertion. Build ids; 0 is the virtual root. Per node: where its run lives in `flat`,
    # its length, the depth of its first token, its parent, the first sequence that reached it, leaf or not.
    src, length, depth, parent, creator, leaf = [0], [0], [0], [-1], [-1], [False]
    children: dict[tuple[int, int], int] = {}  # (parent, first token) -> child

    def add_node(s0, n, d, p, c, is_leaf):
        for column, value in zip((src, length, depth, parent, creator, leaf), (s0, n, d, p, c, is_leaf), strict=True):
            column.append(value)
        return len(src) - 1

    for s in range(num_seqs):
        base, seq_len = off[s], off[s + 1] - off[s]
        cur, pos = 0, 0
        while pos < seq_len:
            first = int(tok[base + pos])
            c = children.get((cur, first))
            if c is None:  # a new branch: the rest of the sequence is one leaf
                children[(cur, first)] = add_node(base + pos, seq_len - pos, pos, cur, s, True)
                leaf[cur] = False
                break
            run = min(length[c], seq_len - pos)
            n = _common_prefix(tok, src[c], base + pos, run)
            if n < run:  # diverges inside the run: split into head [0, n) and tail [n, len)
                head = add_node(src[c], n, depth[c], cur, creator[c], False)
                children[(cur, first)] = head
                src[c] += n
                length[c] -= n
                depth[c] += n
                parent[c] = head
                children[(head, int(tok[src[c]]))] = c
                children[(head, int(tok[base + pos + n]))] = add_node(
                    base + pos + n, seq_len - pos - n, pos + n, head, s, True
                )
                break
            if n < length[c] or pos + n == seq_len:  # ends inside or at the end of the run: no split
                break
            if leaf[c]:  # runs past a leaf: extend it
                src[c], length[c] = base + pos, seq_len - pos
                break
            cur, pos = c, pos + n
    num_nodes = len(src) - 1

    # 2-3. Children in first-appearance order, preorder ids and row ranges.
    kids: list[list[int]] = [[] for _ in range(num_nodes + 1)]
    for b in sorted(range(1, num_nodes + 1), key=lambda b: (parent[b], creator[b])):
        kids[parent[b]].append(b)
    preorder: list[int] = []
    new_id = [-1] * (num_nodes + 1)
    row_start = [0] * (num_nodes + 1)
    stack = kids[0][::-1]
    rows = 0
    while stack:
        b = stack.pop()
        new_id[b] = len(preorder)
        preorder.append(b)
        row_start[b] = rows
        rows += length[b]
        stack.extend(reversed(kids[b]))
    num_unique = rows
    if num_unique >= 2**31 - 1:
        raise ValueError(f"build_prefix_trie: {num_unique} unique tokens; int32 row indices allow at most 2^31 - 1")

    # 4. Subtree ends (reverse preorder visits children first).
    subtree_end = [0] * (num_nodes + 1)
    for b in reversed(preorder):
        subtree_end[b] = max(subtree_end[b], row_start[b] + length[b])
        if parent[b] > 0:
            subtree_end[parent[b]] = max(subtree_end[parent[b]], subtree_end[b])

    # 5. Per-node and per-row outputs, vectorised over rows.
    i64 = torch.int64
    k_len = torch.tensor([length[b] for b in preorder], dtype=i64)
    k_start = torch.tensor([row_start[b] for b in preorder], dtype=i64)
    k_src = torch.tensor([src[b] for b in preorder], dtype=i64)
    k_depth = torch.tensor([depth[b] for b in preorder], dtype=i64)
    k_vis = torch.tensor([subtree_end[b] for b in preorder], dtype=i64)
    node_parent = torch.tensor([new_id[parent[b]] if parent[b] > 0 else -1 for b in preorder], dtype=torch.int32)
    row_node = torch.repeat_interleave(torch.arange(num_nodes, dtype=i64), k_len)
    within = torch.arange(num_unique, dtype=i64) - k_start[row_node]
    tokens = flat[k_src[row_node] + within]
    positions = k_depth[row_node] + within

    # 6. Each sequence's rows: walk it down the final tree, collecting (row start, count) segments.
    seg_start: list[int] = []
    seg_len: list[int] = []
    for s in range(num_seqs):
        base, seq_len = off[s], off[s + 1] - off[s]
        cur, pos = 0, 0
        while pos < seq_len:
            c = children[(cur, int(tok[base + pos]))]
            n = min(length[c], seq_len - pos)
            seg_start.append(row_start[c])
            seg_len.append(n)
            pos += n
            cur = c
    seg_len_t = torch.tensor(seg_len, dtype=i64)
    seg_first = torch.cumsum(seg_len_t, 0) - seg_len_t  # output index of each segment's first row
    seq_rows = torch.repeat_interleave(torch.tensor(seg_start, dtype=i64) - seg_first, seg_len_t) + torch.arange(
        flat.numel(), dtype=i64
    )

    return [
        tokens,
        positions,
        row_node.to(torch.int32),
        k_vis[row_node].to(torch.int32),
        k_start.to(torch.int32),
        (k_start + k_len).to(torch.int32),
        node_parent,
        offsets.clone(),
        seq_rows,
    ]


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def build_prefix_trie(
    sequences: Sequence[Sequence[int] | torch.Tensor], *, backend: Literal["auto", "cpp", "python"] = "auto"
) -> PrefixTrie:
    """Build the packed, path-compressed prefix trie of a batch of token sequences.

    Args:
        sequences: S sequences, each a list of non-negative int token ids, a 1-D integer numpy array or a 1-D integer
            tensor (any device, any strides; copied to the CPU). Empty sequences are allowed (they get no rows).
        backend: "cpp" runs the compiled `torch.ops.credit_C.build_prefix_trie`, "python" the Python twin
            (identical output, slower), "auto" the compiled op when `credit_kernels._ext.use_ext()` allows it
            and the build has it, else the Python twin.

    Returns:
        PrefixTrie of CPU tensors (U unique tokens, K nodes): tokens [U] int64, positions [U] int64,
        token_node [U] int32, visible_end [U] int32, node_start / node_end / node_parent [K] int32,
        seq_ptr [S+1] int64, seq_rows [sum of lengths] int64. See the module docstring for their meaning.

    Raises:
        TypeError: `sequences` is not a list, or an element is not integer token ids.
        ValueError: a token id is negative (the message names `sequences[s][t]`) or past int64, a sequence is
            not 1-D, or `backend` is unknown.
        RuntimeError: backend="cpp" but the compiled extension lacks the op.
    """
    if backend not in ("auto", "cpp", "python"):
        raise ValueError(f"build_prefix_trie: backend must be 'auto', 'cpp' or 'python'; got {backend!r}")
    flat, offsets = _flatten_sequences(sequences)
    backend = _core.resolve_backend("build_prefix_trie", backend, "cpu", choices=("auto", "cpp", "python"),
                                    cpp_op="build_prefix_trie", fallback="python", unavailable=RuntimeError)
    if backend == "cpp":
        out = torch.ops.credit_C.build_prefix_trie(flat, offsets)
    else:
        out = _build_prefix_trie_python(flat, offsets)
    return PrefixTrie(*out)


def trie_stats(trie: PrefixTrie) -> dict[str, float | int]:
    """Sharing statistics of a trie.

    Returns:
        {"sequences": S, "nodes": K, "unique": U, "total": sum of input lengths, "ratio": U / total (1.0 when
        total is 0; lower means more sharing), "saving": total / U (1.0 when U is 0)}.
    """
    unique, total = trie.num_unique, trie.total_tokens
    return {
        "sequences": trie.num_sequences,
        "nodes": trie.num_nodes,
        "unique": unique,
        "total": total,
        "ratio": unique / total if total else 1.0,
        "saving": total / unique if unique else 1.0,
    }


def gather_sequence_rows(trie: PrefixTrie, s: int) -> torch.Tensor:
    """The packed rows of input sequence `s`, one per position: [len(sequences[s])] int64.

    `trie.tokens[gather_sequence_rows(trie, s)]` is sequences[s] and `trie.positions[...]` is arange(len).
    """
    if isinstance(s, bool) or not isinstance(s, int | np.integer):
        raise TypeError(f"gather_sequence_rows: s must be an int sequence index; got {type(s).__name__}")
    num_seqs = trie.num_sequences
    if not -num_seqs <= s < num_seqs:
        raise ValueError(f"gather_sequence_rows: s must be in [-{num_seqs}, {num_seqs}) for S = {num_seqs}; got {s}")
    s = int(s) % num_seqs
    return trie.seq_rows[int(trie.seq_ptr[s]) : int(trie.seq_ptr[s + 1])]
