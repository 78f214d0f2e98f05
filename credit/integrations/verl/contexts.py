r"""The driver-side context step of CREDIT in verl: feedback and partner contexts over the global batch.

The pairs come from ``credit.CreditTeacher(None, tokenizer, ...).pairs`` (the pipeline's feedback rule, partners and
seeds; a model-free teacher, since in verl the weights live in the worker groups, which score the rows). After the
rollouts of a step, the driver holds the whole batch (every prompt group, every response), so partners are drawn over
the global batch with one seed and no gather is needed. For the B responses (1-3 are ``CreditTeacher.pairs``):

1. ``select_feedback``: a successful sibling (summed task reward >= threshold; never the response itself) and/or
   the environment's text feedback; responses with neither get mask 0 and no teacher rows.
2. ``partners``: a seeded group-level derangement, M partner groups per response (docs/method.md).
3. ``build_teacher_pairs``: the aligned context c(x_g(i), f_i) and the M shuffled ones (c(x_j, f_i), or c(x_j, f_j)
   with ``swap="context"``), deduplicated.
4. Teacher rows in the per-sample layout verl's agent loop writes and its workers read (``compute_log_prob`` /
   ``compute_ref_log_prob``): ``prompts`` (the teacher context), ``responses`` (the student's exact response ids),
   ``input_ids`` = prompts + responses, ``position_ids`` = 0..len-1, ``response_mask`` / ``loss_mask`` (ones over
   the response), as jagged rows (``teacher_batch``).

The worker returns ``log_probs`` over prompt + response; verl's ``response_from_nested`` cuts the response part,
and ``assemble_credit_fields`` scatters the rows back per response into the fields the loss reads (``loss.py``):
``credit_teacher_logprobs`` [R_i], ``credit_shuffled_logprobs`` [R_i, M], ``credit_teacher_mask`` [R_i].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from credit.integrations.verl.loss import FIELD_MASK, FIELD_SHUFFLED, FIELD_TEACHER
from credit.pipeline import CreditTeacher, RolloutBatch
from credit.templates import DEFAULT_TEMPLATE, TeacherTemplate

__all__ = [
    "TEACHER_ROW_FIELDS",
    "CreditContexts",
    "assemble_credit_fields",
    "build_credit_contexts",
    "group_index",
    "zero_credit_fields",
]

TEACHER_ROW_FIELDS = ("prompts", "responses", "input_ids", "position_ids", "response_mask", "loss_mask")


def group_index(uids: Sequence[Any]) -> list[int]:
    """verl's per-response ``uid`` (one per prompt group) -> integer group ids in order of first appearance."""
    seen: dict[Any, int] = {}
    return [seen.setdefault(u, len(seen)) for u in uids]


@dataclass(frozen=True)
class CreditContexts:
    """Teacher rows for one global batch and how they map back to the B responses."""

    rows: list[tuple[list[int], list[int]]]
    """(teacher context ids, response ids) of every teacher row: aligned rows first, then partner 1..M."""
    row_index: torch.Tensor
    """[R, 2] int64: (response i, slot k) of row r; k = 0 aligned, k = m for partner m."""
    feedback_mask: torch.Tensor
    """[B] bool: the response has a solution or feedback (it gets a teacher signal)."""
    response_lens: list[int]
    """[B] response lengths (token counts of the student's responses)."""
    num_partners: int
    """M."""

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def teacher_batch(self, pad_to_multiple: int = 1):
        """The teacher rows as a TensorDict of jagged rows (verl's per-sample layout), padded to a multiple.

        Args:
            pad_to_multiple: the row count is rounded up to a multiple of this (the worker group's dispatch needs a
                multiple of its data-parallel size) by repeating the last row; ``row_index`` covers the real rows only.

        Returns:
            tensordict.TensorDict with batch size [R'] and the fields in TEACHER_ROW_FIELDS.
        """
        from tensordict import TensorDict

        if pad_to_multiple < 1:
            raise ValueError(f"CreditContexts.teacher_batch: pad_to_multiple must be >= 1; got {pad_to_multiple}")
        if not self.rows:
            raise ValueError("CreditContexts.teacher_batch: no teacher rows (no response has feedback this step)")
        rows = list(self.rows)
        rows += [rows[-1]] * (-len(rows) % pad_to_multiple)
        cols: dict[str, list[torch.Tensor]] = {k: [] for k in TEACHER_ROW_FIELDS}
        for ctx, resp in rows:
            p = torch.tensor(ctx, dtype=torch.int64)
            r = torch.tensor(resp, dtype=torch.int64)
            ids = torch.cat([p, r])
            ones = torch.ones_like(r)
            for k, v in zip(TEACHER_ROW_FIELDS, (p, r, ids, torch.arange(ids.numel()), ones, ones)):
                cols[k].append(v)
        fields = {k: torch.nested.as_nested_tensor(v, layout=torch.jagged) for k, v in cols.items()}
        return TensorDict(fields, batch_size=[len(rows)])


def build_credit_contexts(
    tokenizer,
    prompts: Sequence[Any],
    uids: Sequence[Any],
    responses_ids: Sequence[Sequence[int]],
    successes: Sequence[bool] | torch.Tensor,
    env_feedback: Sequence[str | None] | None = None,
    *,
    num_partners: int = 1,
    swap: str = "input",
    seed: int = 0,
    step: int = 0,
    template: TeacherTemplate = DEFAULT_TEMPLATE,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> CreditContexts:
    """Feedback, partners and teacher rows for a global batch of B responses (steps 1-4 of the module docstring).

    Args:
        tokenizer: the student's tokenizer (decodes responses for the demonstrations, encodes the contexts).
        prompts: B prompts (verl's ``raw_prompt`` message lists, or str), equal within a group.
        uids: B group keys (verl's ``uid``: one per prompt, shared by its rollout.n responses).
        responses_ids: B lists of the student's response token ids (no padding).
        successes: B bools: the response is a successful demonstration.
        env_feedback: B texts or None entries (the environment's feedback), or None.
        num_partners: M >= 0 shuffled contexts per response; 0 = SDPO (no partners, any number of groups).
        swap: "input" or "context" (see ``credit.build_teacher_pairs``).
        seed, step: the demonstration choice uses seed * 31 + step and the partners seed * 17 + step, as
            ``credit.CreditTeacher.pairs`` does, so the same global batch gets the same feedback and partners here as
            in every other integration.
        template, chat_template_kwargs: the teacher reprompt (default SDPO's).

    Returns:
        CreditContexts. Raises ValueError for M > P - 1 or P = 1 with M >= 1 (``credit.partners``).
    """
    fn = "build_credit_contexts"
    num = len(responses_ids)
    for name, seq in (("prompts", prompts), ("uids", uids)):
        if len(seq) != num:
            raise ValueError(f"{fn}: {name} must have length B = {num} (one per response); got {len(seq)}")
    if isinstance(num_partners, bool) or not isinstance(num_partners, int) or num_partners < 0:
        raise ValueError(f"{fn}: num_partners must be an int >= 0; got {num_partners!r}")
    resp = [[int(t) for t in r] for r in responses_ids]
    batch = RolloutBatch(list(prompts), resp, group_index(uids), successes,
                         None if env_feedback is None else list(env_feedback))
    teacher = CreditTeacher(None, tokenizer, method="credit" if num_partners > 0 else "sdpo",
                            num_partners=max(1, num_partners), swap=swap, template=template, seed=seed,
                            chat_template_kwargs=chat_template_kwargs)
    pairs = teacher.pairs(batch, step=step)
    rows, index = [], []
    for k, slot in enumerate([pairs.pairs_aligned, *pairs.pairs_shuffled]):
        for i, c in slot:
            rows.append((pairs.contexts[c], resp[i]))
            index.append((i, k))
    row_index = torch.tensor(index, dtype=torch.int64).reshape(-1, 2)
    feedback_mask = torch.tensor(pairs.mask, dtype=torch.bool).reshape(-1)
    return CreditContexts(rows, row_index, feedback_mask, [len(r) for r in resp], num_partners)


def assemble_credit_fields(
    contexts: CreditContexts,
    row_logprobs: Sequence[torch.Tensor] | torch.Tensor,
    response_masks: Sequence[torch.Tensor] | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Scatter the teacher rows' response log-probs back per response: the fields ``credit_distillation_loss`` reads.

    Args:
        contexts: from build_credit_contexts.
        row_logprobs: the response part of each teacher row's log-probs (``response_from_nested`` of the worker's
            ``log_probs``): R' >= R rows of [R_i] (a list or a jagged tensor); rows past R (padding) are ignored.
        response_masks: the student's B ``response_mask`` rows (jagged or a list), or None for all ones; the teacher
            mask is response_mask AND feedback_mask.

    Returns:
        dict of jagged [B, R_i(, M)] fp32 tensors: ``credit_teacher_logprobs`` (a; 0 without feedback),
        ``credit_shuffled_logprobs`` (b, [R_i, M]; omitted for M = 0) and ``credit_teacher_mask`` (int64 0/1).
    """
    fn = "assemble_credit_fields"
    rows = list(row_logprobs.unbind(0)) if isinstance(row_logprobs, torch.Tensor) else list(row_logprobs)
    if len(rows) < contexts.num_rows:
        raise ValueError(f"{fn}: row_logprobs has {len(rows)} rows; the contexts have {contexts.num_rows}")
    lens = contexts.response_lens
    num, m = len(lens), contexts.num_partners
    aligned = [torch.zeros(n, dtype=torch.float32) for n in lens]
    shuffled = [torch.zeros(n, m, dtype=torch.float32) for n in lens]
    for r, (i, k) in enumerate(contexts.row_index.tolist()):
        lp = rows[r].detach().float().cpu().reshape(-1)
        if lp.numel() != lens[i]:
            raise ValueError(f"{fn}: row {r} (response {i}) has {lp.numel()} log-probs; the response has {lens[i]}")
        if k == 0:
            aligned[i] = lp
        else:
            shuffled[i][:, k - 1] = lp
    if response_masks is None:
        rmask = [torch.ones(n, dtype=torch.int64) for n in lens]
    else:
        rmask = list(response_masks.unbind(0)) if isinstance(response_masks, torch.Tensor) else list(response_masks)
        if len(rmask) != num:
            raise ValueError(f"{fn}: response_masks must have B = {num} rows; got {len(rmask)}")
    fb = contexts.feedback_mask.tolist()
    mask = [(rm.cpu().bool() & bool(fb[i])).to(torch.int64) for i, rm in enumerate(rmask)]
    for i, (mk, n) in enumerate(zip(mask, lens)):
        if mk.numel() != n:
            raise ValueError(f"{fn}: response_masks[{i}] has {mk.numel()} entries; the response has {n} tokens")

    def jag(xs):
        return torch.nested.as_nested_tensor(xs, layout=torch.jagged)

    out = {FIELD_TEACHER: jag(aligned), FIELD_MASK: jag(mask)}
    if m > 0:  # M = 0 (SDPO): no shuffled field; the loss needs it only for lam > 0
        out[FIELD_SHUFFLED] = jag(shuffled)
    return out


def zero_credit_fields(response_lens: Sequence[int], num_partners: int) -> dict[str, torch.Tensor]:
    """The CREDIT fields for responses without a teacher signal (e.g. verl's padding samples): zeros, mask 0."""

    def jag(xs):
        return torch.nested.as_nested_tensor(xs, layout=torch.jagged)

    out = {FIELD_TEACHER: jag([torch.zeros(n) for n in response_lens]),
           FIELD_MASK: jag([torch.zeros(n, dtype=torch.int64) for n in response_lens])}
    if num_partners > 0:
        out[FIELD_SHUFFLED] = jag([torch.zeros(n, num_partners) for n in response_lens])
    return out
