"""The student's log-probs of its own responses in one packed forward over a prefix trie, with gradients (issue 12).

A step's B = P x G responses share their group's prompt, yet the padded update runs every (prompt, response)
sequence whole, forward and backward: G copies of each prompt. Here the sequences prompt + response[:-1] (the last
response token predicts nothing) go into one prefix trie (`build_prefix_trie`), the trie's unique tokens run ONE
forward through the unmodified transformers model, with position ids from the trie and attention done by
`tree_attention` (causal inside a node, full to its ancestors), plugged in through transformers' attention
interface exactly as `TeacherScorer` does it, and the final hidden states are gathered only at the rows that
predict response tokens before the fused `linear_logprob` (or `linear_topk` / `linear_gather` at top-k level).
Autograd runs back through the gather, the model and `tree_attention`'s backward, so a shared prompt row receives
the summed gradient of every response that continues it: the same parameter gradients as the padded path, from
fewer tokens.

Row of sequence s at position t predicts token t + 1, so response r's predicting rows are positions
len(prompt) - 1 .. len(prompt) + len(r) - 2 of its sequence; their trie rows come from `trie.seq_rows`. Identical
sequences (two equal rollouts) share every row; the gather hands each copy the same hidden state, and its
backward adds their gradients, as the padded path does.

Memory. Activations grow with the unique tokens of one forward. `plan_packs` splits a batch into packs of WHOLE
groups (a prompt is computed once per pack) under a token budget, greedily in the groups' order, so consecutive
groups stay consecutive; a group larger than the budget is split by response (each part recomputes the prompt),
and a single sequence longer than the budget runs alone. `iter_packed_logprobs` yields one pack at a time: the
caller computes its loss and calls backward before the next pack (gradient accumulation).

Supported: the families `TeacherScorer`'s tree path supports (Llama, Mistral, Qwen2, Qwen3 with a bias-free linear
head), with or without transformers' activation checkpointing (the backward's layer replays run inside the
hook too, `credit.scoring.attention.tree_attention_active`), without attention dropout in training, and with
sequences inside any sliding window. `packed_unsupported` says why not, so a trainer can fall back to the padded
path; the functions here raise ValueError with that reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from credit.scoring.attention import TreeState, checkpointed_layers, tree_attention_active
from credit.scoring.chunks import pred_index
from credit.scoring.inspection import device_of, sliding_window, tree_unsupported
from credit.scoring.validation import _ids_array
from credit_kernels.linear_logprob import linear_logprob
from credit_kernels.prefix_trie import build_prefix_trie
from credit_kernels.tree_attention import tree_attention_plan

__all__ = ["PackedRows", "iter_packed_logprobs", "packed_response_rows", "packed_student_logprobs",
           "packed_unsupported", "plan_packs"]

_ATTN_BACKENDS = ("auto", "triton", "torch")  # flex: no backward on CPU, and the plan here carries no BlockMask


class PackedRows(NamedTuple):
    """`packed_response_rows` result: the hidden states that predict response tokens, (response, token) order."""

    hidden: torch.Tensor
    """[N, d] final hidden states (after the model's last norm) in the model's dtype, N = sum(lengths);
    differentiable w.r.t. the model's parameters when grad is enabled."""
    targets: torch.Tensor
    """[N] int64: the response token each row predicts."""
    lengths: list[int]
    """[B] response lengths; response i owns rows sum(lengths[:i]) .. sum(lengths[:i + 1]) - 1."""
    unique_tokens: int
    """Tokens the forward ran (the trie's unique tokens)."""
    total_tokens: int
    """Sum of len(prompt) + len(response) - 1 over non-empty responses: what the padded path runs (no padding)."""


# ---------------------------------------------------------------------------------------------------------------------
# Support and validation
# ---------------------------------------------------------------------------------------------------------------------
def packed_unsupported(model, max_len: int | None = None) -> str | None:
    """Why the packed path cannot reproduce the padded student forward/backward of `model`, or None.

    Args:
        model: a transformers causal LM.
        max_len: the longest sequence (prompt + response) the call will run, for the sliding-window check.
    """
    reason = tree_unsupported(model)
    if reason is not None:
        return reason
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    if getattr(model, flag, False) and not checkpointed_layers(model):  # transformers' own: its replays are hooked
        return ("gradient checkpointing is on without transformers' per-layer checkpoint function, so its recompute "
                "in the backward would run outside the tree attention hook (model.gradient_checkpointing_disable() "
                "first)")
    dropout = float(getattr(model.config, "attention_dropout", 0.0) or 0.0)
    if model.training and dropout > 0:
        return f"config.attention_dropout = {dropout} in training mode; tree attention applies no dropout"
    window = sliding_window(model.config)
    if window is not None and max_len is not None and max_len > window:
        return f"sequences of {max_len} tokens exceed the model's sliding window ({window}), which is not applied"
    return None


def _token_lists(fn: str, prompts, responses, vocab: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    for name, seqs in (("prompts", prompts), ("responses", responses)):
        if isinstance(seqs, (str, bytes, torch.Tensor)) or not isinstance(seqs, Sequence):
            raise TypeError(f"{fn}: {name} must be a list of token-id lists; got {type(seqs).__name__}")
    if len(prompts) != len(responses):
        raise ValueError(f"{fn}: prompts and responses must pair up one to one; got {len(prompts)} prompts and "
                         f"{len(responses)} responses")
    p = [_ids_array(fn, "prompts", i, s, vocab) for i, s in enumerate(prompts)]
    r = [_ids_array(fn, "responses", i, s, vocab) for i, s in enumerate(responses)]
    for i, (a, b) in enumerate(zip(p, r)):
        if b.size and not a.size:
            raise ValueError(f"{fn}: prompts[{i}] is empty but responses[{i}] is not; the first response token needs "
                             "at least one prompt token (e.g. BOS)")
    return p, r


def _vocab(fn: str, model) -> int:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"{fn}: model must be a transformers PreTrainedModel; got {type(model).__name__}")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or head is None:
        raise TypeError(f"{fn}: model must be a causal LM with input and output embeddings; got {type(model).__name__}")
    return min(int(emb.weight.shape[0]), int(head.weight.shape[0]))


def _sequences(p: list[np.ndarray], r: list[np.ndarray], items) -> list[np.ndarray]:
    """prompt + response[:-1] of the items with a non-empty response (what the model must run)."""
    return [np.concatenate([p[i], r[i][:-1]]) for i in items if r[i].size]


def _unique(p, r, items) -> int:
    seqs = _sequences(p, r, items)
    return build_prefix_trie(seqs).num_unique if seqs else 0


# ---------------------------------------------------------------------------------------------------------------------
# Packs of whole groups under a token budget
# ---------------------------------------------------------------------------------------------------------------------
def plan_packs(prompts, responses, *, max_tokens: int, group_ids=None) -> list[list[int]]:
    """Split a batch into packs of whole groups, each at most `max_tokens` unique tokens in one forward.

    Args:
        prompts, responses: B token-id lists each (lists of ints or 1-D integer tensors/arrays).
        max_tokens: unique tokens (trie rows) per pack: bounds one forward's activation memory.
        group_ids: [B] ints (list or tensor), the group of each response; default: responses with identical
            prompts form a group.

    Returns:
        Index lists covering 0..B-1 once each: groups in the order of their first response, a group's responses in
        batch order. Groups stay whole unless one alone exceeds max_tokens (then it is split by response, and a
        single sequence longer than max_tokens runs alone, with a warning). Contiguous groups give contiguous packs.
    """
    fn = "plan_packs"
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"{fn}: max_tokens must be an int >= 1; got {max_tokens!r}")
    p, r = _token_lists(fn, prompts, responses, vocab=np.iinfo(np.int64).max)
    groups = _groups(fn, p, group_ids)
    packs: list[list[int]] = []
    cur: list[int] = []
    oversized = 0
    for g in groups:
        if cur and _unique(p, r, cur + g) <= max_tokens:
            cur = cur + g
            continue
        if cur:
            packs.append(cur)
            cur = []
        if _unique(p, r, g) <= max_tokens:
            cur = list(g)
            continue
        for i in g:  # a group larger than the budget: split by response, each part recomputes the prompt
            if cur and _unique(p, r, cur + [i]) > max_tokens:
                packs.append(cur)
                cur = []
            cur.append(i)
            oversized += len(cur) == 1 and _unique(p, r, cur) > max_tokens
    if cur:
        packs.append(cur)
    if oversized:
        warnings.warn(f"plan_packs: {oversized} sequence(s) exceed max_tokens={max_tokens}; each runs alone in one "
                      "forward", stacklevel=2)
    return packs


def _groups(fn: str, p: list[np.ndarray], group_ids) -> list[list[int]]:
    """Index lists per group, in the order of each group's first response."""
    if group_ids is None:
        keys = [a.tobytes() for a in p]
    else:
        ids = group_ids.tolist() if isinstance(group_ids, (torch.Tensor, np.ndarray)) else list(group_ids)
        if len(ids) != len(p):
            raise ValueError(f"{fn}: group_ids must have one entry per response ({len(p)}); got {len(ids)}")
        if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in ids):
            raise TypeError(f"{fn}: group_ids must hold ints; got {ids[:8]!r}")
        keys = ids
    index: dict = {}
    out: list[list[int]] = []
    for i, key in enumerate(keys):
        if key not in index:
            index[key] = len(out)
            out.append([])
        out[index[key]].append(i)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The packed forward
# ---------------------------------------------------------------------------------------------------------------------
def packed_response_rows(model, prompts, responses, *, attn_backend: str = "auto",
                         check_inputs: bool = True) -> PackedRows:
    """Hidden states at the rows predicting each response's tokens, from ONE packed forward over the prompt trie.

    The counterpart of a padded forward of every prompt + response followed by a gather at the response
    positions: same values and, through autograd, the same parameter gradients (up to float rounding), while each
    shared prefix runs once. Runs in whatever mode the model is in (train or eval) and grad state the caller set.

    Args:
        model: a transformers causal LM of a supported family (`packed_unsupported(model)` is None); never
            modified: its attention implementation is switched to tree attention for the forward and restored.
        prompts, responses: B token-id lists each (ints or 1-D integer tensors); responses may be empty.
        attn_backend: tree_attention's backend: "auto" (CUDA: Triton; CPU: the torch reference), "triton", "torch".
        check_inputs: validate the trie plan's values on the device (one sync).

    Returns:
        PackedRows(hidden [N, d], targets [N] int64, lengths, unique_tokens, total_tokens), rows in
        (response, token) order on the model's device.
    """
    fn = "packed_response_rows"
    if attn_backend not in _ATTN_BACKENDS:
        raise ValueError(f"{fn}: attn_backend must be one of {_ATTN_BACKENDS}; got {attn_backend!r}")
    vocab = _vocab(fn, model)
    p, r = _token_lists(fn, prompts, responses, vocab)
    lengths = [int(x.size) for x in r]
    items = [i for i in range(len(r)) if r[i].size]
    seqs = _sequences(p, r, items)
    max_len = max((s.size for s in seqs), default=0)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and max_len > max_pos:
        raise ValueError(f"{fn}: a prompt + response of {max_len + 1} tokens exceeds the model's "
                         f"max_position_embeddings = {max_pos}")
    reason = packed_unsupported(model, max_len)
    if reason is not None:
        raise ValueError(f"{fn}: cannot run {type(model).__name__} packed: {reason}; use the padded path "
                         "(share_prompts=False)")
    device = device_of(model)
    weight = model.get_output_embeddings().weight
    if not seqs:
        hidden = torch.zeros((0, weight.shape[1]), dtype=weight.dtype, device=device)
        return PackedRows(hidden, torch.zeros(0, dtype=torch.int64, device=device), lengths, 0, 0)
    trie = build_prefix_trie(seqs)
    n_ctx = np.asarray([p[i].size for i in items], dtype=np.int64)
    n_resp = np.asarray([r[i].size for i in items], dtype=np.int64)
    rows = trie.seq_rows.numpy()[pred_index(n_ctx, n_resp, trie.seq_ptr.numpy()[:-1])]
    hidden = _tree_forward(model, trie, device, attn_backend, check_inputs, max_len)
    targets = torch.from_numpy(np.concatenate([r[i] for i in items])).to(device)
    return PackedRows(hidden[torch.from_numpy(rows).to(device)], targets, lengths, trie.num_unique,
                      int(trie.total_tokens))


def _tree_forward(model, trie, device, attn_backend: str, check_inputs: bool, max_len: int) -> torch.Tensor:
    """[U, d] final hidden states of the trie's packed tokens through the model's body, attention on the trie."""
    plan = tree_attention_plan(trie, device=device, check_inputs=check_inputs)
    state = TreeState(plan, attn_backend, max_len)
    base = getattr(model, model.base_model_prefix)
    input_ids = trie.tokens.to(device, non_blocking=True)[None]
    position_ids = trie.positions.to(device, non_blocking=True)[None]
    with tree_attention_active(model, state):
        out = base(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    layers = getattr(model.config, "num_hidden_layers", None)
    if state.calls == 0 or (layers is not None and state.calls != layers):
        raise RuntimeError(f"packed_response_rows: the tree attention ran in {state.calls} of {layers} layers; "
                           f"{type(model).__name__} does not route attention through AttentionInterface. Use the "
                           "padded path (share_prompts=False).")
    return out.last_hidden_state[0]


def _to_padded(rows: torch.Tensor, lengths: list[int], width: int) -> torch.Tensor:
    """[sum(lengths)] rows in (response, token) order -> [len(lengths), width], zeros beyond each length."""
    out = rows.new_zeros((len(lengths), width))
    keep = torch.arange(width, device=rows.device)[None, :] < torch.tensor(lengths, device=rows.device)[:, None]
    return out.masked_scatter(keep, rows)


def packed_student_logprobs(model, prompts, responses, *, width: int | None = None, temperature: float = 1.0,
                            attn_backend: str = "auto", check_inputs: bool = True) -> torch.Tensor:
    """[B, T] fp32 log S(response_it | prompt_i, response_i<t) from one packed forward (grad when enabled).

    Args:
        model, prompts, responses, attn_backend, check_inputs: as in `packed_response_rows`.
        width: T, the padded width (>= the longest response); default the longest response (at least 1).
        temperature: divides the logits (linear_logprob's temperature).

    Returns:
        [B, T] fp32 on the model's device, zeros beyond each response's length: the layout of the padded
        trainer's student log-probs.
    """
    pr = packed_response_rows(model, prompts, responses, attn_backend=attn_backend, check_inputs=check_inputs)
    longest = max(pr.lengths, default=0)
    width = max(1, longest) if width is None else width
    if isinstance(width, bool) or not isinstance(width, int) or width < longest:
        raise ValueError(f"packed_student_logprobs: width must be an int >= the longest response ({longest}); "
                         f"got {width!r}")
    weight = model.get_output_embeddings().weight
    logp = linear_logprob(pr.hidden, weight.to(pr.hidden.dtype), pr.targets, temperature=temperature,
                          check_inputs=check_inputs)
    return _to_padded(logp, pr.lengths, width)


def iter_packed_logprobs(model, prompts, responses, *, max_tokens: int, group_ids=None, width: int | None = None,
                         temperature: float = 1.0, attn_backend: str = "auto",
                         check_inputs: bool = True) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (indices, [len(indices), T] log-probs) per pack of whole groups (`plan_packs`), one forward each.

    Call backward on each pack's loss before taking the next: then only one pack's activations are alive, and
    the gradients accumulate in the parameters. width defaults to the batch's longest response, so every pack's
    rows line up with the batch's [B, T] tensors.
    """
    packs = plan_packs(prompts, responses, max_tokens=max_tokens, group_ids=group_ids)
    if width is None:
        width = max(1, max((len(x) for x in responses), default=0))
    for idx in packs:
        yield idx, packed_student_logprobs(model, [prompts[i] for i in idx], [responses[i] for i in idx],
                                           width=width, temperature=temperature, attn_backend=attn_backend,
                                           check_inputs=check_inputs)
