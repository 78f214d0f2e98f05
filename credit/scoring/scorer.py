"""`TeacherScorer`: per-token teacher log-probs of many (response, context) pairs in one packed forward.

CREDIT scores every response y_i under its own teacher context and M shuffled ones (docs/method.md):

    a_it = log T(y_it | c(x_g(i), f_i), y_i<t)      b_it^m = log T(y_it | c(x_pi_m(i), f_i), y_i<t)

i.e. (M + 1) * B sequences context + response, which share long prefixes (template + prompt; the same sibling
solution across a group). The scorer builds one prefix trie over those sequences (`build_prefix_trie`), runs ONE
forward of the trie's unique tokens through the unmodified transformers model, with position ids from the trie
and attention done by `tree_attention` (the hook in credit/scoring/attention.py), takes the final hidden states
only at the rows that predict response tokens, and projects them with the fused heads (projection.py; never the
U x V logits). Memory stays bounded by scoring in chunks of at most `max_tokens` unique tokens (chunks.py).

The last token of each sequence predicts nothing that is scored, so the trie holds context + response[:-1]; the
row of position t predicts token t + 1, hence the response's predicting rows are positions len(context) - 1 ..
len(context) + len(response) - 2. Rows are deduplicated on (row, target) before the vocabulary projection:
identical pairs, or pairs that agree up to a point, project each shared row once.

Backends: "tree" (above; Llama, Mistral, Qwen2 and Qwen3 families, inspection.py), "naive" (left-padded batches
of whole sequences through the model's own forward and full logits at the response positions, the fallback for
any causal LM and the peer), "auto" ("tree" when the family and head are supported, else "naive").
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import numpy as np
import torch

from credit.scoring.attention import TreeState, tree_attention_active
from credit.scoring.chunks import pack_batches, plan_chunks, pred_index, sub_trie
from credit.scoring.inspection import device_of, sliding_window, tree_unsupported
from credit.scoring.projection import head_logprob, head_topk, logprob_from_logits, topk_from_logits
from credit.scoring.validation import Work, prepare_work, split_results
from credit.templates import TeacherPairs
from credit_kernels.prefix_trie import build_prefix_trie
from credit_kernels.tree_attention import tree_attention_plan

__all__ = ["TeacherScorer", "TeacherScores", "TeacherTopk"]

_BACKENDS = ("auto", "tree", "naive")
_ATTN_BACKENDS = ("auto", "triton", "flex", "torch")


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
        reason = tree_unsupported(model)
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
        return split_results(work, logp)

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
        return TeacherTopk(split_results(work, logp), split_results(work, tail))

    def score_teacher_pairs(self, teacher_pairs) -> TeacherScores:
        """Aligned and shuffled pairs of a `credit.TeacherPairs` in ONE call (one trie shares across all of them).

        Returns:
            TeacherScores(aligned: one [L_i] fp32 tensor per entry of pairs_aligned, shuffled: M lists like it, one
            per pairs_shuffled[m]), in the same order as the pair lists.
        """
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

    def _prepare(self, fn, contexts, responses, pairs, ids) -> Work:
        return prepare_work(fn, contexts, responses, pairs, ids, vocab=self.vocab, max_positions=self.max_positions)

    # -- execution -----------------------------------------------------------------------------------------------
    def _run(self, work: Work, *, topk: bool) -> tuple[torch.Tensor, ...]:
        model = self.model
        backend = self.backend
        max_len = max((s.size for s in work.seqs), default=0)
        window = sliding_window(model.config)
        if backend == "tree" and window is not None and max_len > window:
            if not self.auto:
                raise ValueError(f"TeacherScorer: sequences of {max_len} tokens exceed the model's sliding window "
                                 f"({window}), which backend='tree' does not apply; use backend='naive' or 'auto'")
            backend = "naive"
        self.last_backend = backend
        self.last_total_tokens = work.total_tokens
        device = device_of(model)
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
            return head_topk(hidden, weight, keys, temperature=self.temperature)
        return head_logprob(hidden, weight, keys[:, 0], temperature=self.temperature, check_inputs=self.check_inputs)

    def _run_tree(self, work: Work, outs, device, topk: bool) -> None:
        trie = build_prefix_trie(work.seqs)
        items_all = np.arange(len(work.seqs), dtype=np.int64)
        chunks = [items_all]
        if trie.num_unique > self.max_tokens:
            chunks = [np.asarray(c, dtype=np.int64) for c in plan_chunks(work.seqs, trie, self.max_tokens)]
        ptr, seq_rows = trie.seq_ptr.numpy(), trie.seq_rows.numpy()
        base = getattr(self.model, self.model.base_model_prefix)
        unique = 0
        attn = {"calls": 0, "masks_seen": 0}
        for items in chunks:
            # rows predicting the items' response tokens (in the whole trie) and their flat target indices
            pred = seq_rows[pred_index(work.n_ctx[items], work.n_resp[items], ptr[items])]
            flat = pred_index(np.ones_like(items), work.n_resp[items], work.offsets[items])  # the targets
            packed, rows = (trie, pred) if len(chunks) == 1 else sub_trie(trie, items, pred)
            unique += packed.tokens.numel()
            hidden = self._tree_forward(base, packed, device, attn)
            self._project(hidden, torch.from_numpy(rows), torch.from_numpy(flat), work.keys, outs, topk)
        self.last_unique_tokens = unique
        self.last_num_chunks = len(chunks)
        self._last_attn = attn

    def _tree_forward(self, base, packed, device, attn: dict) -> torch.Tensor:
        """One forward of packed unique tokens (a PrefixTrie or Packed) -> final hidden states [U, d] (normed)."""
        # one plan per chunk, shared by every layer; for "flex" it carries the BlockMask too
        plan = tree_attention_plan(packed, device=device, check_inputs=self.check_inputs,
                                   backend="flex" if self.attn_backend == "flex" else "triton")
        state = TreeState(plan, self.attn_backend, int(packed.positions.max()) + 1)
        input_ids = packed.tokens.to(device, non_blocking=True)[None]
        position_ids = packed.positions.to(device, non_blocking=True)[None]
        with tree_attention_active(self.model, state):
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

    def _run_naive(self, work: Work, outs, device, topk: bool) -> None:
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
        batches = pack_batches(lengths, self.max_tokens)
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
                    outs[0][flat_t[sl]], outs[1][flat_t[sl]] = topk_from_logits(z, kk)
                else:
                    outs[0][flat_t[sl]] = logprob_from_logits(z, kk[:, 0])
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
