"""Host-side validation of the scorer's inputs (token ids, pairs, top-k ids), before anything reaches the device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def _ids_array(fn: str, name: str, idx: int, seq, vocab: int) -> np.ndarray:
    """One token-id list as a 1-D int64 numpy array with every id in [0, vocab), else TypeError / ValueError."""
    if isinstance(seq, torch.Tensor):
        if seq.dtype.is_floating_point or seq.dtype.is_complex or seq.dtype == torch.bool:
            raise TypeError(f"{fn}: {name}[{idx}] must hold integer token ids; got dtype {seq.dtype}")
        a = seq.detach().cpu().numpy()
    else:
        if isinstance(seq, (str, bytes)) or not isinstance(seq, (Sequence, np.ndarray)):
            raise TypeError(f"{fn}: {name}[{idx}] must be a list of int token ids; got {type(seq).__name__}")
        try:
            a = np.asarray(seq)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{fn}: {name}[{idx}] must be a flat list of int token ids: {e}") from None
        if a.size == 0:
            a = np.zeros(0, dtype=np.int64)
        elif a.dtype.kind not in "iu":
            raise TypeError(f"{fn}: {name}[{idx}] must hold int token ids; got {a.dtype} values")
    if a.ndim != 1:
        raise ValueError(f"{fn}: {name}[{idx}] must be 1-D; got shape {a.shape}")
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= vocab:
            t = int(np.argmax((a < 0) | (a >= vocab)))
            raise ValueError(f"{fn}: token ids must lie in [0, V={vocab}) (the model's vocabulary); got "
                             f"{name}[{idx}][{t}] = {int(a[t])}")
    return a.astype(np.int64, copy=False)


def _pair_list(fn: str, pairs, num_responses: int, num_contexts: int) -> list[tuple[int, int]]:
    if isinstance(pairs, torch.Tensor):
        pairs = pairs.tolist()
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(f"{fn}: pairs must be a list of (response_index, context_index); got {type(pairs).__name__}")
    out = []
    for p, pair in enumerate(pairs):
        if not isinstance(pair, (Sequence, np.ndarray)) or isinstance(pair, (str, bytes)) or len(pair) != 2:
            raise ValueError(f"{fn}: pairs[{p}] must be (response_index, context_index); got {pair!r}")
        i, j = pair
        if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in (i, j)):
            raise TypeError(f"{fn}: pairs[{p}] must hold two ints; got {pair!r}")
        if not 0 <= i < num_responses:
            raise ValueError(f"{fn}: pairs[{p}] response index must be in [0, {num_responses}) "
                             f"(len(responses)); got {int(i)}")
        if not 0 <= j < num_contexts:
            raise ValueError(f"{fn}: pairs[{p}] context index must be in [0, {num_contexts}) "
                             f"(len(contexts)); got {int(j)}")
        out.append((int(i), int(j)))
    return out


def _token_lists(fn: str, name: str, seqs, vocab: int) -> list[np.ndarray]:
    if isinstance(seqs, (str, bytes, torch.Tensor)) or not isinstance(seqs, Sequence):
        raise TypeError(f"{fn}: {name} must be a list of token-id lists; got {type(seqs).__name__}")
    return [_ids_array(fn, name, k, s, vocab) for k, s in enumerate(seqs)]


@dataclass
class Work:
    """The pairs of one call with a non-empty response (the items), checked and flattened."""

    seqs: list[np.ndarray]  # per item: context + response[:-1] (what the model must run)
    n_ctx: np.ndarray  # [I] context lengths
    n_resp: np.ndarray  # [I] response lengths (>= 1)
    offsets: np.ndarray  # [I + 1] item -> flat target range
    keys: torch.Tensor  # [T, c] int64: targets (c = 1) or top-k ids (c = k), T = sum n_resp
    item_of_pair: list[int]  # -1 for empty responses
    total_tokens: int


def prepare_work(fn: str, contexts, responses, pairs, ids, *, vocab: int, max_positions: int | None) -> Work:
    """Checked inputs -> the work items of a call, one per pair with a non-empty response."""
    ctx = _token_lists(fn, "contexts", contexts, vocab)
    resp = _token_lists(fn, "responses", responses, vocab)
    pair_list = _pair_list(fn, pairs, len(resp), len(ctx))
    if ids is not None:
        if isinstance(ids, (str, bytes, torch.Tensor)) or not isinstance(ids, Sequence):
            raise TypeError(f"{fn}: ids must be a list of P [len, k] integer tensors; got {type(ids).__name__}")
        if len(ids) != len(pair_list):
            raise ValueError(f"{fn}: ids must have one entry per pair ({len(pair_list)}); got {len(ids)}")
    seqs, n_ctx, n_resp, keys, item_of_pair = [], [], [], [], []
    total = 0
    k = k_empty = None
    for p, (i, j) in enumerate(pair_list):
        c, r = ctx[j], resp[i]
        length = c.size + r.size
        if max_positions is not None and length > max_positions:
            raise ValueError(f"{fn}: pairs[{p}] = ({i}, {j}) makes a sequence of {length} tokens; the model "
                             f"has max_position_embeddings = {max_positions}")
        if ids is not None:
            key = _ids_entry(fn, p, ids[p], r.size, k, vocab)
            if r.size:  # the first non-empty response fixes k
                k = key.shape[1] if k is None else k
            elif k_empty is None and key.dim() == 2:
                k_empty = key.shape[1]
        if r.size == 0:
            item_of_pair.append(-1)
            continue
        if c.size == 0:
            raise ValueError(f"{fn}: contexts[{j}] is empty but pairs[{p}] scores a non-empty response under "
                             "it; the first response token needs at least one context token (e.g. BOS)")
        item_of_pair.append(len(seqs))
        seqs.append(np.concatenate([c, r[:-1]]))
        n_ctx.append(c.size)
        n_resp.append(r.size)
        keys.append(torch.from_numpy(r)[:, None] if ids is None else key)
        total += length
    n_resp_a = np.asarray(n_resp, dtype=np.int64)
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(n_resp_a, out=offsets[1:])
    width = 1 if ids is None else next((w for w in (k, k_empty) if w is not None), 0)
    key_t = torch.cat(keys) if keys else torch.zeros((0, width), dtype=torch.int64)
    return Work(seqs, np.asarray(n_ctx, dtype=np.int64), n_resp_a, offsets, key_t, item_of_pair, total)

def _ids_entry(fn, p, entry, length, k, vocab: int) -> torch.Tensor:
    """ids[p] as a CPU int64 [length, k] tensor, checked (k: fixed by an earlier pair, or None)."""
    t = entry if isinstance(entry, torch.Tensor) else torch.as_tensor(np.asarray(entry))
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{fn}: ids[{p}] must be an integer tensor; got {t.dtype}")
    if length == 0 and t.numel() == 0:  # [0, k] or an empty list for an empty response
        return t.detach().to("cpu", torch.int64).reshape(0, t.shape[-1] if t.dim() == 2 else 0)
    if t.dim() != 2 or t.shape[0] != length or t.shape[1] < 1 or (k is not None and t.shape[1] != k):
        want = f"[{length}, {k if k is not None else 'k'}]"
        raise ValueError(f"{fn}: ids[{p}] must have shape {want} (response length, k); got {tuple(t.shape)}")
    t = t.detach().to("cpu", torch.int64)
    bad = (t < 0) | (t >= vocab)
    if bool(bad.any()):
        r, c = bad.nonzero()[0].tolist()
        raise ValueError(f"{fn}: ids must lie in [0, V={vocab}); got ids[{p}][{r}, {c}] = {int(t[r, c])}")
    return t

def split_results(work: Work, flat: torch.Tensor) -> list[torch.Tensor]:
    """Flat per-target results [T, ...] -> one tensor per pair ([0, ...] for an empty response)."""
    empty = flat.new_empty((0, *flat.shape[1:]))
    parts = torch.split(flat, work.n_resp.tolist()) if work.n_resp.size else ()
    return [empty if q < 0 else parts[q] for q in work.item_of_pair]
