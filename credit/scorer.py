"""Teacher scoring with shared-prefix reuse: one packed forward over a prefix trie (issue 5, part 3).

CREDIT scores every response y_i under its own teacher context and M shuffled ones (../shared/CREDIT.md):

    a_it = log T(y_it | c(x_g(i), f_i), y_i<t)      b_it^m = log T(y_it | c(x_pi_m(i), f_i), y_i<t)

i.e. (M + 1) * B sequences context + response, which share long prefixes (template + prompt; the same sibling
solution across a group). `TeacherScorer` builds one prefix trie over those sequences (`build_prefix_trie`), runs
ONE forward of the trie's unique tokens through the unmodified transformers model, with position ids from the trie
and attention done by `tree_attention` (plugged in through transformers' AttentionInterface as "credit_tree"),
takes the final hidden states only at the rows that predict response tokens, and projects them with the fused
`linear_logprob` (never the U x V logits). Memory stays bounded by scoring in chunks of at most `max_tokens`
unique tokens.

Chunking. The sequences are sorted by the trie row of their last token (the trie's DFS preorder, i.e.
lexicographic order), so consecutive sequences share the longest prefixes: the rows a sequence adds to a chunk
are its length minus its common prefix with the previous one. Chunks are greedy runs of that order, so a chunk is
a union of whole subtrees whenever they fit; a subtree larger than `max_tokens` is split by sequence (each chunk
recomputes the shared ancestors it needs), and a single sequence longer than `max_tokens` is scored alone, with a
warning. A chunk's rows are cut from the whole trie (the union of its sequences' root paths keeps the preorder
property, so visible_end just re-indexes), and each chunk runs one forward.

The last token of each sequence predicts nothing that is scored, so the trie holds context + response[:-1]; the
row of position t predicts token t + 1, hence the response's predicting rows are positions len(context) - 1 ..
len(context) + len(response) - 2. Rows are deduplicated on (row, target) before the vocabulary projection:
identical pairs, or pairs that agree up to a point, project each shared row once.

Backends: "tree" (above; Llama, Mistral, Qwen2 and Qwen3 families), "naive" (left-padded batches of whole
sequences through the model's own forward and full logits at the response positions, the fallback for any causal
LM and the peer), "auto" ("tree" when the family and head are supported, else "naive").
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from credit_kernels.linear_logprob import linear_logprob
from credit_kernels.prefix_trie import PrefixTrie, build_prefix_trie
from credit_kernels.tree_attention import tree_attention, tree_attention_plan

__all__ = ["SUPPORTED_MODEL_TYPES", "TeacherScorer", "TeacherScores", "TeacherTopk"]

# Families whose attention goes through transformers' AttentionInterface with plain softmax attention, rotary
# positions from position_ids and an unscaled linear LM head: exactly what the tree path reproduces.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTN_IMPLEMENTATION = "credit_tree"
_BACKENDS = ("auto", "tree", "naive")
_ATTN_BACKENDS = ("auto", "triton", "flex", "torch")
# Config fields that change the logits or the attention scores in ways the tree path does not reproduce.
_UNSUPPORTED_CONFIG = ("final_logit_softcapping", "attn_logit_softcapping", "logit_scale", "logits_scaling")


class TeacherTopk(NamedTuple):
    """`TeacherScorer.score_topk` result, one entry per pair (L = that pair's response length)."""

    logp: list[torch.Tensor]
    """[L, k] fp32 teacher log-probs at the given ids."""
    tail: list[torch.Tensor]
    """[L] fp32 log(1 - sum_k p) over the ids (each distinct id counted once); -inf when they cover the vocabulary."""


class TeacherScores(NamedTuple):
    """`TeacherScorer.score_teacher_pairs` result: per-token log-probs a (aligned) and b^m (shuffled)."""

    aligned: list[torch.Tensor]
    """One [L_i] fp32 tensor per aligned pair."""
    shuffled: list[list[torch.Tensor]]
    """[M] lists, each with one [L_i] fp32 tensor per shuffled pair of partner m."""


# ---------------------------------------------------------------------------------------------------------------------
# The attention hook: transformers calls it in every layer while a TeacherScorer forward is active
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _TreeState:
    plan: Any  # TreeAttentionPlan on the model's device
    attn_backend: str
    max_len: int  # longest sequence in the chunk (sliding-window guard)
    block_mask: Any = None  # flex BlockMask, built once per chunk
    calls: int = 0
    masks_seen: int = 0


# A context variable, not a forward kwarg: transformers versions differ in which kwargs reach the attention
# function, and the state must never leak into a forward that is not ours.
_STATE: contextvars.ContextVar[_TreeState | None] = contextvars.ContextVar("credit_tree_state", default=None)


def _credit_tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [1, Hq, U, D], key/value [1, Hkv, U, D] -> ([1, U, Hq, D], None)."""
    state = _STATE.get()
    if state is None:
        raise RuntimeError(
            f"credit: attention implementation {ATTN_IMPLEMENTATION!r} only runs inside TeacherScorer; this model's "
            "config still names it (restore it with model.set_attn_implementation('sdpa'))"
        )
    if query.shape[0] != 1:
        raise RuntimeError(f"credit_tree attention expects one packed row (batch 1); got batch {query.shape[0]}")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise RuntimeError(f"credit_tree attention does not support {name!r}; use TeacherScorer(backend='naive')")
    window = kwargs.get("sliding_window")
    if window is not None and state.max_len > window:  # checked up front too; this guards other model code
        raise RuntimeError(f"credit_tree attention: sequences of {state.max_len} tokens exceed the sliding window "
                           f"{window}; use TeacherScorer(backend='naive')")
    if attention_mask is not None:  # transformers built a mask we ignore: the tree defines visibility
        state.masks_seen += 1
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [U, H, D] views
    if state.block_mask is not None:
        from credit_kernels.tree_attention import _tree_attention_flex

        out = _tree_attention_flex(q, k, v, state.plan.visible_end, scaling, block_mask=state.block_mask).out
    else:
        out = tree_attention(q, k, v, state.plan, scale=scaling, backend=state.attn_backend, check_inputs=False).out
    state.calls += 1
    return out.unsqueeze(0), None


_registered = False


def _register_attention() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_IMPLEMENTATION, _credit_tree_attention)
        _registered = True


def _set_attn(model, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (AttributeError, TypeError):  # older transformers: the config field is the switch
        model.config._attn_implementation = name


@contextlib.contextmanager
def _tree_attention_active(model, state: _TreeState):
    """Route the model's attention to tree_attention for the block; always restore the original implementation."""
    _register_attention()
    original = model.config._attn_implementation
    token = _STATE.set(state)
    try:
        _set_attn(model, ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"TeacherScorer: {type(model).__name__} refused attention implementation "
                             f"{ATTN_IMPLEMENTATION!r}; use backend='naive'")
        yield state
    finally:
        _STATE.reset(token)
        if model.config._attn_implementation != original:
            _set_attn(model, original)


# ---------------------------------------------------------------------------------------------------------------------
# Model inspection
# ---------------------------------------------------------------------------------------------------------------------
def _tree_unsupported(model) -> str | None:
    """Why the tree path cannot score `model` exactly, or None."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of the supported families {SUPPORTED_MODEL_TYPES}"
    for name in _UNSUPPORTED_CONFIG:
        val = getattr(config, name, None)
        if val is not None and not (name in ("logit_scale", "logits_scaling") and val == 1):
            return f"config.{name} = {val} (logit scaling/softcapping) is not reproduced by the tree path"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return f"the LM head must be a bias-free nn.Linear; got {type(head).__name__}"
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or base is model:
        return "no base model (model.model) to take the final hidden states from"
    if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
        return "the model cannot switch its attention implementation"
    return None


def _sliding_window(config) -> int | None:
    """The attention window some layer applies, or None."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def _device_of(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary projections (hidden rows -> fp32 log-probs at target ids)
# ---------------------------------------------------------------------------------------------------------------------
def _topk_from_logits(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [n, V], ids [n, k] -> (logp [n, k], tail [n]).

    The tail is the logsumexp over the vocabulary entries NOT among the ids, minus the full logsumexp: no
    cancellation when the ids hold almost all the mass (log1p(-sum p) would lose it), -inf when they hold all.
    """
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(1, ids) - lse[:, None]
    rest = logits.scatter(1, ids, float("-inf"))
    return logp, torch.logsumexp(rest, dim=-1) - lse


def _linear_gather_fallback(hidden, weight, ids, *, chunk_rows: int, temperature: float = 1.0):
    logps, tails = [], []
    for a in range(0, hidden.shape[0], chunk_rows):
        z = (hidden[a : a + chunk_rows] @ weight.T).float() / temperature  # [chunk, V]: the materialised fallback
        lp, tl = _topk_from_logits(z, ids[a : a + chunk_rows])
        logps.append(lp)
        tails.append(tl)
    if not logps:
        return ids.new_empty(ids.shape, dtype=torch.float32), ids.new_empty((0,), dtype=torch.float32)
    return torch.cat(logps), torch.cat(tails)


def _fused_gather():
    """`linear_gather(hidden, weight, ids, *, tail=True) -> (logp, tail)` from credit_kernels, if this build has it."""
    for name in ("credit_kernels.linear_gather", "credit_kernels.linear_topk"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        fn = getattr(module, "linear_gather", None)
        if fn is not None:
            return fn
    return None


def _linear_gather(hidden, weight, ids, *, chunk_rows: int, temperature: float = 1.0):
    """The fused `linear_gather` when available (never N x V), else a chunked torch projection."""
    fused = _fused_gather()
    if fused is None:
        return _linear_gather_fallback(hidden, weight, ids, chunk_rows=chunk_rows, temperature=temperature)
    logp, tail = fused(hidden, weight, ids, tail=True, temperature=temperature)
    return logp, tail


# ---------------------------------------------------------------------------------------------------------------------
# Work items: one per pair with a non-empty response
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _Work:
    seqs: list[np.ndarray]  # per item: context + response[:-1] (what the model must run)
    n_ctx: np.ndarray  # [I] context lengths
    n_resp: np.ndarray  # [I] response lengths (>= 1)
    offsets: np.ndarray  # [I + 1] item -> flat target range
    keys: torch.Tensor  # [T, c] int64: targets (c = 1) or top-k ids (c = k), T = sum n_resp
    item_of_pair: list[int]  # -1 for empty responses
    total_tokens: int


def _pred_index(n_ctx: np.ndarray, n_resp: np.ndarray, seq_start: np.ndarray) -> np.ndarray:
    """Flat indices (into a per-sequence row table starting at seq_start) of the rows predicting responses."""
    starts = seq_start + n_ctx - 1
    total = int(n_resp.sum())
    first = np.cumsum(n_resp) - n_resp
    return np.repeat(starts - first, n_resp) + np.arange(total, dtype=np.int64)


def _plan_chunks(seqs: list[np.ndarray], trie: PrefixTrie, max_tokens: int) -> list[list[int]]:
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


class _Packed(NamedTuple):
    """A chunk's packed tokens in the whole trie's preorder: the fields tree attention and the forward read."""

    tokens: torch.Tensor  # [u] int64
    positions: torch.Tensor  # [u] int64
    visible_end: torch.Tensor  # [u] int32


def _sub_trie(trie: PrefixTrie, items: np.ndarray, pred: np.ndarray) -> tuple[_Packed, np.ndarray]:
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
    packed = _Packed(trie.tokens[idx], trie.positions[idx], torch.from_numpy(vis.astype(np.int32)))
    return packed, before[pred]


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------
class TeacherScorer:
    """Per-token teacher log-probs of many (response, context) pairs, computing shared prefixes once.

    Args:
        model: a transformers causal LM (e.g. LlamaForCausalLM); never modified. Its attention implementation is
            switched to "credit_tree" during a tree forward and restored afterwards, and it runs in eval mode
            during a call (the training flag is restored). Not thread-safe: one call at a time per model.
        backend: "auto" ("tree" for the supported families, see SUPPORTED_MODEL_TYPES, with a plain linear LM
            head; else "naive"), "tree" (error for unsupported models), "naive" (padded batches, any causal LM).
            Under "auto" a call whose sequences exceed a sliding attention window runs "naive".
        attn_backend: tree_attention's backend: "auto" (CUDA: Triton for head dims 16-128, else flex; CPU: the
            torch reference), "triton", "flex", "torch".
        max_tokens: tokens per forward: unique tokens per trie chunk ("tree"), padded batch x length ("naive").
            Bounds activation memory; a single longer sequence runs alone (with a warning).
        chunk_rows: rows per vocabulary projection where logits are materialised (the naive backend, and the
            top-k gather when credit_kernels.linear_gather is absent): ~ chunk_rows x V x 4 bytes extra.
        temperature: the teacher's softmax temperature: log-probs of softmax(logits / temperature).
        check_inputs: the device-side checks: the tree attention plan's values, linear_logprob's target range and
            NaN/inf scan (a few host syncs). Token ids, pairs and top-k ids are always checked on the host.

    Attributes (of the last call):
        last_unique_tokens: tokens run through the model (the sum of the chunks' unique tokens for "tree", the
            non-padding tokens of the distinct sequences for "naive").
        last_total_tokens: sum over pairs with a non-empty response of len(context) + len(response): what
            scoring each pair by itself would run.
        last_num_chunks: forwards run. last_backend: "tree" or "naive".
    """

    def __init__(
        self,
        model,
        *,
        backend: str = "auto",
        attn_backend: str = "auto",
        max_tokens: int = 32768,
        chunk_rows: int = 4096,
        check_inputs: bool = True,
        temperature: float = 1.0,
    ):
        fn = "TeacherScorer"
        if backend not in _BACKENDS:
            raise ValueError(f"{fn}: backend must be one of {_BACKENDS}; got {backend!r}")
        if attn_backend not in _ATTN_BACKENDS:
            raise ValueError(f"{fn}: attn_backend must be one of {_ATTN_BACKENDS}; got {attn_backend!r}")
        for name, val in (("max_tokens", max_tokens), ("chunk_rows", chunk_rows)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{fn}: {name} must be an int >= 1; got {val!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"{fn}: temperature must be a number > 0; got {temperature!r}")
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"{fn}: model must be a transformers PreTrainedModel; got {type(model).__name__}")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if head is None or emb is None:
            raise TypeError(f"{fn}: model must be a causal LM with input and output embeddings; got "
                            f"{type(model).__name__}")
        reason = _tree_unsupported(model)
        if backend == "tree" and reason is not None:
            raise ValueError(f"{fn}: backend='tree' cannot score {type(model).__name__}: {reason}. "
                             "Use backend='naive' (or 'auto').")
        self.model = model
        self.backend = backend if backend != "auto" else ("tree" if reason is None else "naive")
        self.auto = backend == "auto"
        self.attn_backend = attn_backend
        self.max_tokens = max_tokens
        self.chunk_rows = chunk_rows
        self.check_inputs = check_inputs
        self.temperature = float(temperature)
        # token ids index the embedding and targets the head: both must hold every id
        self.vocab = min(int(emb.weight.shape[0]), int(head.weight.shape[0]))
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.last_unique_tokens = 0
        self.last_total_tokens = 0
        self.last_num_chunks = 0
        self.last_backend: str | None = None
        self._last_attn: dict = {}

    # -- public entry points -------------------------------------------------------------------------------------
    def score(self, contexts, responses, pairs) -> list[torch.Tensor]:
        """Teacher log-probs of each pair's response tokens under context + response.

        Args:
            contexts: C token-id lists (list of ints or 1-D integer tensors); non-empty where a pair scores a
                non-empty response under it (the first response token needs a preceding row).
            responses: R token-id lists (may be empty).
            pairs: P (response_index, context_index) pairs (a list, or a [P, 2] integer tensor).

        Returns:
            P fp32 tensors on the model's device; entry p is [len(responses[i])]: log T(response_t | context,
            response_<t) for pair p = (i, j). An empty response gives an empty tensor.
        """
        work = self._prepare("TeacherScorer.score", contexts, responses, pairs, None)
        (logp,) = self._run(work, topk=False)
        return self._split(work, logp)

    def score_topk(self, contexts, responses, pairs, ids) -> TeacherTopk:
        """Teacher log-probs at given token ids per response position, plus the tail bucket (logit-level loss).

        Args:
            contexts, responses, pairs: as in `score`.
            ids: P integer tensors (or nested lists), entry p of shape [len(responses[i]), k], the same k for
                every pair (e.g. the student's top-k ids); ids in [0, V).

        Returns:
            TeacherTopk(logp: P tensors [L, k] fp32, tail: P tensors [L] fp32), tail = log(1 - sum of the
            probabilities of the distinct ids), computed from the non-gathered logits (stable near mass 1).
        """
        work = self._prepare("TeacherScorer.score_topk", contexts, responses, pairs, ids)
        logp, tail = self._run(work, topk=True)
        return TeacherTopk(self._split(work, logp), self._split(work, tail))

    def score_teacher_pairs(self, teacher_pairs) -> TeacherScores:
        """Aligned and shuffled pairs of a `credit.TeacherPairs` in ONE call (one trie shares across all of them).

        Returns:
            TeacherScores(aligned: one [L_i] fp32 tensor per entry of pairs_aligned, shuffled: M lists like it, one
            per pairs_shuffled[m]), in the same order as the pair lists.
        """
        from credit.templates import TeacherPairs

        if not isinstance(teacher_pairs, TeacherPairs):
            raise TypeError(f"TeacherScorer.score_teacher_pairs: teacher_pairs must be a credit.TeacherPairs; got "
                            f"{type(teacher_pairs).__name__}")
        groups = [teacher_pairs.pairs_aligned, *teacher_pairs.pairs_shuffled]
        flat = self.score(teacher_pairs.contexts, teacher_pairs.responses_ids, [pr for g in groups for pr in g])
        out, a = [], 0
        for g in groups:
            out.append(flat[a : a + len(g)])
            a += len(g)
        return TeacherScores(out[0], out[1:])

    # -- preparation ---------------------------------------------------------------------------------------------
    def _prepare(self, fn, contexts, responses, pairs, ids) -> _Work:
        vocab = self.vocab
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
            if self.max_positions is not None and length > self.max_positions:
                raise ValueError(f"{fn}: pairs[{p}] = ({i}, {j}) makes a sequence of {length} tokens; the model "
                                 f"has max_position_embeddings = {self.max_positions}")
            if ids is not None:
                key = self._ids_entry(fn, p, ids[p], r.size, k)
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
        return _Work(seqs, np.asarray(n_ctx, dtype=np.int64), n_resp_a, offsets, key_t, item_of_pair, total)

    def _ids_entry(self, fn, p, entry, length, k) -> torch.Tensor:
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
        bad = (t < 0) | (t >= self.vocab)
        if bool(bad.any()):
            r, c = bad.nonzero()[0].tolist()
            raise ValueError(f"{fn}: ids must lie in [0, V={self.vocab}); got ids[{p}][{r}, {c}] = {int(t[r, c])}")
        return t

    @staticmethod
    def _split(work: _Work, flat: torch.Tensor) -> list[torch.Tensor]:
        """Flat per-target results [T, ...] -> one tensor per pair ([0, ...] for an empty response)."""
        empty = flat.new_empty((0, *flat.shape[1:]))
        parts = torch.split(flat, work.n_resp.tolist()) if work.n_resp.size else ()
        return [empty if q < 0 else parts[q] for q in work.item_of_pair]

    # -- execution -----------------------------------------------------------------------------------------------
    def _run(self, work: _Work, *, topk: bool) -> tuple[torch.Tensor, ...]:
        model = self.model
        backend = self.backend
        max_len = max((s.size for s in work.seqs), default=0)
        window = _sliding_window(model.config)
        if backend == "tree" and window is not None and max_len > window:
            if not self.auto:
                raise ValueError(f"TeacherScorer: sequences of {max_len} tokens exceed the model's sliding window "
                                 f"({window}), which backend='tree' does not apply; use backend='naive' or 'auto'")
            backend = "naive"
        self.last_backend = backend
        self.last_total_tokens = work.total_tokens
        device = _device_of(model)
        n, k = work.keys.shape
        outs = (torch.empty(n, dtype=torch.float32, device=device),)
        if topk:
            outs = (torch.empty((n, k), dtype=torch.float32, device=device), outs[0])
        if not work.seqs:
            self.last_unique_tokens = self.last_num_chunks = 0
            return outs
        was_training = model.training
        model.eval()  # teacher passes: no dropout
        try:
            with torch.inference_mode():
                if backend == "tree":
                    self._run_tree(work, outs, device, topk)
                else:
                    self._run_naive(work, outs, device, topk)
        finally:
            model.train(was_training)
        return outs

    def _head(self, hidden: torch.Tensor, keys: torch.Tensor, topk: bool) -> tuple[torch.Tensor, ...]:
        weight = self.model.get_output_embeddings().weight
        if topk:
            return _linear_gather(hidden, weight, keys, chunk_rows=self.chunk_rows, temperature=self.temperature)
        return (linear_logprob(hidden, weight, keys[:, 0], temperature=self.temperature,
                               check_inputs=self.check_inputs),)

    def _run_tree(self, work: _Work, outs, device, topk: bool) -> None:
        trie = build_prefix_trie(work.seqs)
        items_all = np.arange(len(work.seqs), dtype=np.int64)
        chunks = [items_all]
        if trie.num_unique > self.max_tokens:
            chunks = [np.asarray(c, dtype=np.int64) for c in _plan_chunks(work.seqs, trie, self.max_tokens)]
        ptr, seq_rows = trie.seq_ptr.numpy(), trie.seq_rows.numpy()
        base = getattr(self.model, self.model.base_model_prefix)
        unique = 0
        attn = {"calls": 0, "masks_seen": 0}
        for items in chunks:
            # rows predicting the items' response tokens (in the whole trie) and their flat target indices
            pred = seq_rows[_pred_index(work.n_ctx[items], work.n_resp[items], ptr[items])]
            flat = _pred_index(np.ones_like(items), work.n_resp[items], work.offsets[items])  # the targets
            packed, rows = (trie, pred) if len(chunks) == 1 else _sub_trie(trie, items, pred)
            unique += packed.tokens.numel()
            hidden = self._tree_forward(base, packed, device, attn)
            self._project(hidden, torch.from_numpy(rows), torch.from_numpy(flat), work.keys, outs, topk)
        self.last_unique_tokens = unique
        self.last_num_chunks = len(chunks)
        self._last_attn = attn

    def _tree_forward(self, base, packed, device, attn: dict) -> torch.Tensor:
        """One forward of packed unique tokens (a PrefixTrie or _Packed) -> final hidden states [U, d] (normed)."""
        plan = tree_attention_plan(packed, device=device, check_inputs=self.check_inputs)
        state = _TreeState(plan, self.attn_backend, int(packed.positions.max()) + 1)
        if self.attn_backend == "flex":  # one BlockMask per chunk, not one per layer
            from credit_kernels.tree_attention import _flex_block_mask

            state.block_mask = _flex_block_mask(plan.visible_end)
        input_ids = packed.tokens.to(device, non_blocking=True)[None]
        position_ids = packed.positions.to(device, non_blocking=True)[None]
        with _tree_attention_active(self.model, state):
            out = base(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        layers = getattr(self.model.config, "num_hidden_layers", None)
        if state.calls == 0 or (layers is not None and state.calls != layers):
            raise RuntimeError(f"TeacherScorer: the tree attention ran in {state.calls} of {layers} layers; "
                               f"{type(self.model).__name__} does not route attention through AttentionInterface. "
                               "Use backend='naive'.")
        attn["calls"] += state.calls
        attn["masks_seen"] += state.masks_seen
        return out.last_hidden_state[0]

    def _project(self, hidden, rows, flat, keys, outs, topk) -> None:
        """Vocabulary projection of the predicting rows, each distinct (row, key) once; results into outs[flat]."""
        dev = hidden.device
        key = keys[flat]  # [n, c]
        if not topk:  # (row, target) as one int64: rows < 2^31, targets < V
            uniq, inverse = torch.unique(rows * self.vocab + key[:, 0], return_inverse=True)
            urows, ukeys = uniq // self.vocab, (uniq % self.vocab)[:, None]
        else:  # by row, when every copy of a row asks for the same ids (identical pairs); else no dedupe
            urows, inverse = torch.unique(rows, return_inverse=True)
            some = torch.zeros_like(urows).scatter_(0, inverse, torch.arange(rows.numel()))  # any copy of each row
            ukeys = key[some]
            if not torch.equal(ukeys[inverse], key):
                urows, inverse, ukeys = rows, torch.arange(rows.numel()), key
        res = self._head(hidden[urows.to(dev)], ukeys.to(dev), topk)
        flat_d, inv_d = flat.to(dev), inverse.to(dev)
        for out, r in zip(outs, res):
            out[flat_d] = r[inv_d]

    def _run_naive(self, work: _Work, outs, device, topk: bool) -> None:
        """Left-padded batches of the distinct sequences through the model's own forward, full logits per row."""
        index: dict[bytes, int] = {}
        useq_of_item = np.empty(len(work.seqs), dtype=np.int64)
        useqs: list[np.ndarray] = []
        for q, s in enumerate(work.seqs):  # identical sequences run once
            useq_of_item[q] = index.setdefault(s.tobytes(), len(useqs))
            if useq_of_item[q] == len(useqs):
                useqs.append(s)
        items_of: list[list[int]] = [[] for _ in useqs]
        for q, u in enumerate(useq_of_item.tolist()):
            items_of[u].append(q)
        lengths = np.asarray([s.size for s in useqs], dtype=np.int64)
        params = inspect.signature(self.model.forward).parameters
        keys = work.keys.to(device)
        batches = _pack_batches(lengths, self.max_tokens)
        for batch in batches:
            items = [q for u in batch for q in items_of[u]]
            keep = int(work.n_resp[items].max())  # responses end the sequences: only the last `keep` columns
            logits = self._naive_logits([useqs[u] for u in batch], keep, params, device)  # [B, keep, V]
            row_of = {u: b for b, u in enumerate(batch)}
            # the sequence's last row predicts its final response token: response rows are its last n_resp columns
            sel_b = np.concatenate([np.full(work.n_resp[q], row_of[int(useq_of_item[q])]) for q in items])
            sel_c = np.concatenate([np.arange(keep - work.n_resp[q], keep) for q in items])
            flat = np.concatenate([np.arange(work.offsets[q], work.offsets[q + 1]) for q in items])
            sel_b_t, sel_c_t, flat_t = (torch.from_numpy(x).to(device) for x in (sel_b, sel_c, flat))
            for a in range(0, flat_t.numel(), self.chunk_rows):  # fp32 log-softmax, chunk_rows rows at a time
                sl = slice(a, a + self.chunk_rows)
                z = logits[sel_b_t[sl], sel_c_t[sl]].float()  # [chunk, V]
                if self.temperature != 1.0:
                    z = z / self.temperature
                kk = keys[flat_t[sl]]
                if topk:
                    outs[0][flat_t[sl]], outs[1][flat_t[sl]] = _topk_from_logits(z, kk)
                else:
                    outs[0][flat_t[sl]] = z.gather(1, kk)[:, 0] - torch.logsumexp(z, dim=-1)
            del logits
        self.last_unique_tokens = int(lengths.sum())
        self.last_num_chunks = len(batches)
        self._last_attn = {}

    def _naive_logits(self, seqs: list[np.ndarray], keep: int, params, device) -> torch.Tensor:
        """Logits of the last `keep` columns of a left-padded batch: [B, keep, V] in the model's dtype."""
        width = max(s.size for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.int64)
        mask = torch.zeros((len(seqs), width), dtype=torch.int64)
        for b, s in enumerate(seqs):  # left padding: every sequence ends at the last column
            ids[b, width - s.size :] = torch.from_numpy(s)
            mask[b, width - s.size :] = 1
        kw = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
        if "position_ids" in params:  # positions restart at 0 after the padding
            kw["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0).to(device)
        if "logits_to_keep" in params:
            kw["logits_to_keep"] = keep
        return self.model(**kw).logits[:, -keep:]


def _pack_batches(lengths: np.ndarray, max_tokens: int) -> list[list[int]]:
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
