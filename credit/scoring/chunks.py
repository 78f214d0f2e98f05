"""Chunk planning: which sequences share one packed forward (tree backend) or one padded batch (naive backend).

Chunking. The sequences are sorted by the trie row of their last token (the trie's DFS preorder, i.e.
lexicographic order), so consecutive sequences share the longest prefixes: the rows a sequence adds to a chunk
are its length minus its common prefix with the previous one. Chunks are greedy runs of that order, so a chunk is
a union of whole subtrees whenever they fit; a subtree larger than `max_tokens` is split by sequence (each chunk
recomputes the shared ancestors it needs), and a single sequence longer than `max_tokens` is scored alone, with a
warning. A chunk's rows are cut from the whole trie (the union of its sequences' root paths keeps the preorder
property, so visible_end just re-indexes), and each chunk runs one forward.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch

from credit_kernels.prefix_trie import PrefixTrie


def pred_index(n_ctx: np.ndarray, n_resp: np.ndarray, seq_start: np.ndarray) -> np.ndarray:
    """Flat indices (into a per-sequence row table starting at seq_start) of the rows predicting responses."""
    starts = seq_start + n_ctx - 1
    total = int(n_resp.sum())
    first = np.cumsum(n_resp) - n_resp
    return np.repeat(starts - first, n_resp) + np.arange(total, dtype=np.int64)


def plan_chunks(seqs: list[np.ndarray], trie: PrefixTrie, max_tokens: int) -> list[list[int]]:
    """Items grouped into chunks of <= max_tokens unique tokens, in trie preorder (see the module docstring)."""
    ptr = trie.seq_ptr.numpy()
    rows = trie.seq_rows.numpy()
    ends = rows[ptr[1:] - 1]
    order = np.argsort(ends, kind="stable")  # lexicographic order of the sequences
    chunks: list[list[int]] = []
    cur: list[int] = []
    used = 0
    prev = None
    for s in order.tolist():
        r = rows[ptr[s] : ptr[s + 1]]
        if prev is None:
            new = r.size
        else:  # rows shared with the previous sequence in preorder = rows shared with the whole chunk
            m = min(r.size, prev.size)
            diff = np.flatnonzero(r[:m] != prev[:m])
            new = r.size - (int(diff[0]) if diff.size else m)
        if cur and used + new > max_tokens:
            chunks.append(cur)
            cur, used, new = [], 0, r.size
        cur.append(s)
        used += new
        prev = r
    if cur:
        chunks.append(cur)
    _warn_oversized(np.diff(ptr), max_tokens)
    return chunks


def _warn_oversized(lengths: np.ndarray, max_tokens: int) -> None:
    over = lengths > max_tokens
    if over.any():  # stacklevel: the user's score() call
        warnings.warn(f"TeacherScorer: {int(over.sum())} sequence(s) of up to {int(lengths.max())} tokens exceed "
                      f"max_tokens={max_tokens}; each runs alone in one forward", stacklevel=6)


class Packed(NamedTuple):
    """A chunk's packed tokens in the whole trie's preorder: the fields tree attention and the forward read."""

    tokens: torch.Tensor  # [u] int64
    positions: torch.Tensor  # [u] int64
    visible_end: torch.Tensor  # [u] int32


def sub_trie(trie: PrefixTrie, items: np.ndarray, pred: np.ndarray) -> tuple[Packed, np.ndarray]:
    """The rows of a subset of the sequences, cut from the whole trie (no rebuild); `pred` mapped to them.

    The subset's rows (the union of its sequences' root paths) keep their preorder, so a node's subtree restricted
    to them is still a contiguous range, and visible_end maps to the number of kept rows before it.
    """
    ptr = trie.seq_ptr.numpy()
    lens = ptr[items + 1] - ptr[items]
    starts = np.repeat(ptr[items] - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()), dtype=np.int64)
    mark = np.zeros(trie.num_unique, dtype=bool)
    mark[trie.seq_rows.numpy()[starts]] = True
    kept = np.flatnonzero(mark)  # ascending: preorder
    before = np.zeros(trie.num_unique + 1, dtype=np.int64)  # before[x] = kept rows < x = local index of row x
    np.cumsum(mark, out=before[1:])
    vis = before[trie.visible_end.numpy()[kept]]
    idx = torch.from_numpy(kept)
    packed = Packed(trie.tokens[idx], trie.positions[idx], torch.from_numpy(vis.astype(np.int32)))
    return packed, before[pred]


def pack_batches(lengths: np.ndarray, max_tokens: int) -> list[list[int]]:
    """Sequences, longest first, into batches whose padded size (count x longest) stays within max_tokens."""
    batches: list[list[int]] = []
    cur: list[int] = []
    for u in np.argsort(-lengths, kind="stable").tolist():
        if cur and (len(cur) + 1) * int(lengths[cur[0]]) > max_tokens:
            batches.append(cur)
            cur = []
        cur.append(u)
    if cur:
        batches.append(cur)
    _warn_oversized(lengths, max_tokens)
    return batches
