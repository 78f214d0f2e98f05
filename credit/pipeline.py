r"""The CREDIT teacher pipeline every trainer calls: rollouts in, teacher log-probs and token rewards out.

    RolloutBatch (prompts, response ids, group ids, success, feedback)       <- any trainer's rollouts + env
      -> CreditTeacher.score: select_feedback -> partners -> build_teacher_pairs
           -> TeacherScorer (one packed prefix-trie forward, aligned + M shuffled)   -> a [B, T], b [M, B, T], masks
      -> CreditTeacher.rewards(scores, s, mask): credit_reward op -> token rewards + per-sequence pMI diagnostics
         (or CreditTeacher.score_topk -> teacher log-probs + tail at the student's top-k ids, contrastive teacher)
      -> the trainer's own loss, update and teacher weights (EMA / frozen / live: the caller's choice)

A trainer with its own context rules (TRL's) builds the TeacherPairs itself: ``score(pairs=...)`` /
``score_topk(pairs=...)``. ``CreditTeacher(None, tokenizer, ...)`` builds pairs without a model (verl's driver).

The method (docs/method.md; arXiv 2605.11613): with a = log T(y_t | c(x, f), y_<t) (aligned teacher),
b^m = log T(y_t | c(x_m, f), y_<t) (M shuffled partner inputs), s the student's log-probs and
beta = mean_m b^m (or log-mean-exp), the token reward is

    sdpo:    r = a - s
    credit:  r = a - s - lam * (beta - s)          (lam = 0 is SDPO, lam = 1 the pure contrast a - beta)

Seeds: the feedback choice uses seed * 31 + step, the partners seed * 17 + step, so every process that holds
the same global batch draws the same feedback and partners.

Shards. A data-parallel process holds only part of the global batch. Gather the global RolloutBatch on every
process (e.g. ``torch.distributed.all_gather_object``) and pass ``shard=`` the indices of this process's responses:
feedback (a successful sibling may live on another process) and partners are drawn over the whole batch, and only
the shard's responses are scored; every returned tensor has one row per shard entry, in shard order.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from credit.losses import ContrastiveTeacher, contrastive_teacher_topk
from credit.options import method_option_error
from credit.pairing import partner_draw_seed
from credit.pairing import partners as draw_partners
from credit.rewards import sdpo_rewards
from credit.scoring import TeacherScorer
from credit.templates import DEFAULT_TEMPLATE, TeacherPairs, build_teacher_pairs, select_feedback
from credit_kernels import credit_reward

__all__ = ["CreditTeacher", "RolloutBatch", "TeacherLogprobs", "TokenRewards", "TopkTeacher"]

METHODS = ("credit", "sdpo")


@dataclass
class RolloutBatch:
    """What any trainer has after its rollouts and environment, one entry per response (B responses).

    Args:
        prompts: B prompts x, one per response (equal within a group): a str, or a chat message list
            ({"role", "content"} dicts; the last user message becomes the teacher's reprompt).
        response_ids: B lists (or 1-D tensors) of the student's response token ids.
        group_ids: [B] ints, the group (prompt) of each response.
        success: [B] bools, whether each response is a successful demonstration for its siblings.
        feedback: B environment feedback texts (str or None), or None for no text feedback.
        outcome: optional [B] outcome rewards (not used by the teacher; carried for the caller's losses).
        texts: optional B response texts for the sibling solutions; None decodes response_ids with the teacher's
            tokenizer (``skip_special_tokens=True``).
    """

    prompts: list
    response_ids: list
    group_ids: torch.Tensor | list
    success: torch.Tensor | list
    feedback: list | None = None
    outcome: torch.Tensor | None = None
    texts: list | None = None

    def __post_init__(self):
        fn = "RolloutBatch"
        for name in ("prompts", "response_ids"):
            v = getattr(self, name)
            if isinstance(v, (str, bytes, torch.Tensor)) or not isinstance(v, Sequence):
                raise TypeError(f"{fn}: {name} must be a list with one entry per response; got {type(v).__name__}")
        num = len(self.response_ids)
        self.response_ids = [[int(t) for t in (r.tolist() if isinstance(r, torch.Tensor) else r)]
                             for r in self.response_ids]
        for name in ("prompts", "group_ids", "success", "feedback", "outcome", "texts"):
            v = getattr(self, name)
            if v is not None and len(v) != num:
                raise ValueError(f"{fn}: {name} must have B = {num} entries (one per response); got {len(v)}")
        gids = self.group_ids
        if isinstance(gids, torch.Tensor):
            if gids.dim() != 1 or gids.is_floating_point() or gids.dtype == torch.bool:
                raise TypeError(f"{fn}: group_ids must be a [B] integer tensor; got {gids.dtype} of shape "
                                f"{tuple(gids.shape)}")
            self.group_ids = gids.to(torch.long)
        else:
            for i, g in enumerate(gids):
                if isinstance(g, bool) or not isinstance(g, numbers.Integral):
                    raise TypeError(f"{fn}: group_ids must hold ints; got {type(g).__name__} {g!r} at index {i}")
            self.group_ids = torch.tensor([int(g) for g in gids], dtype=torch.long)
        succ = self.success
        self.success = (succ.to(torch.bool) if isinstance(succ, torch.Tensor)
                        else torch.tensor([bool(s) for s in succ], dtype=torch.bool))

    def __len__(self) -> int:
        return len(self.response_ids)


@dataclass
class TeacherLogprobs:
    """`CreditTeacher.score` result, padded to T response tokens (0 beyond a response and where mask is 0)."""

    aligned: torch.Tensor
    """a: [B, T] fp32 aligned teacher log-probs log T(y_t | c(x, f), y_<t)."""
    shuffled: torch.Tensor
    """b: [M, B, T] fp32 shuffled teacher log-probs log T(y_t | c(x_m, f), y_<t) (M = 0 for sdpo)."""
    response_mask: torch.Tensor
    """[B, T] float: 1 at the response's tokens."""
    teacher_mask: torch.Tensor
    """[B] bool: the response has feedback (a sibling solution and/or environment text), hence a teacher signal."""

    @property
    def mask(self) -> torch.Tensor:
        """[B, T] float: response tokens that have a teacher signal."""
        return self.response_mask * self.teacher_mask[:, None]

    def __getitem__(self, idx) -> TeacherLogprobs:
        """The rows `idx` (a list, slice or index tensor of responses), e.g. one micro-batch."""
        return TeacherLogprobs(self.aligned[idx], self.shuffled[:, idx], self.response_mask[idx],
                               self.teacher_mask[idx])


@dataclass
class TokenRewards:
    """`CreditTeacher.rewards` result: token rewards (stop-gradient advantages) and per-sequence diagnostics."""

    rewards: torch.Tensor
    """[B, T] fp32 token rewards, 0 where mask is 0."""
    mask: torch.Tensor
    """[B, T] float: the tokens the rewards cover (the given mask times the teacher mask)."""
    pmi: torch.Tensor
    """[B] fp32 sum_t (a - s): pMI(y; f | x) under the posterior-compatibility assumption."""
    contrastive_pmi: torch.Tensor | None
    """[B] fp32 log T(y|x,f) - log mean_m T(y|x_m,f) (credit only; None for sdpo)."""
    contrastive_pmi_surrogate: torch.Tensor | None
    """[B] fp32 sum_t (a - beta), the token-decomposable upper bound of contrastive_pmi (credit only)."""
    teacher_mask: torch.Tensor
    """[B] bool, as in TeacherLogprobs."""
    sdpo: torch.Tensor | None = None
    """[B, T] fp32 (a - s) on the mask: SDPO's reward (for credit, the (1 - lam) part; for display)."""
    contrast: torch.Tensor | None = None
    """[B, T] fp32 (a - beta) on the mask: the input-specific contrast, the lam part of CREDIT (None for sdpo)."""

    def metrics(self) -> dict[str, float]:
        """Means over the responses with a teacher signal: credit/pmi (+ contrastive_pmi and its surrogate);
        empty when no response has one. Each value is a host sync."""
        rows = self.teacher_mask
        if not bool(rows.any()):
            return {}
        out = {"credit/pmi": self.pmi[rows].mean().item()}
        if self.contrastive_pmi is not None:
            out["credit/contrastive_pmi"] = self.contrastive_pmi[rows].mean().item()
            out["credit/contrastive_pmi_surrogate"] = self.contrastive_pmi_surrogate[rows].mean().item()
        return out


@dataclass
class TopkTeacher:
    """`CreditTeacher.score_topk` result over the responses' tokens flattened in (response, token) order.

    Rows of responses without a teacher signal hold 0 (row_mask False). ``offsets[i]:offsets[i + 1]`` are
    response i's rows.
    """

    logp: torch.Tensor
    """[N, k] fp32 aligned teacher log-probs at the student's ids."""
    tail: torch.Tensor
    """[N] fp32 aligned teacher tail log(1 - sum_k p)."""
    shuffled_logp: torch.Tensor
    """[M, N, k] fp32 shuffled teachers at the same ids (M = 0 for sdpo)."""
    shuffled_tail: torch.Tensor
    """[M, N] fp32."""
    row_mask: torch.Tensor
    """[N] bool: the row's response has a teacher signal."""
    offsets: list[int]
    """[B + 1] row offsets of the responses."""
    teacher_mask: torch.Tensor | None
    """[B] bool per response, as in TeacherLogprobs (None on a row selection)."""
    target: ContrastiveTeacher | None = None
    """The distillation target over all rows, when score_topk was given the student's log-probs: the contrastive
    teacher (credit) or the aligned teacher (sdpo)."""

    def rows(self, idx) -> TopkTeacher:
        """The rows `idx` (a slice, bool mask or index tensor over the N rows); offsets are dropped."""
        tgt = self.target
        if tgt is not None:
            tgt = ContrastiveTeacher(tgt.topk_logp[idx], None if tgt.tail_logp is None else tgt.tail_logp[idx])
        return TopkTeacher(self.logp[idx], self.tail[idx], self.shuffled_logp[:, idx], self.shuffled_tail[:, idx],
                           self.row_mask[idx], [], None, tgt)


class CreditTeacher:
    """Teacher scoring and token rewards for SDPO / CREDIT, the one pipeline every trainer calls.

    Args:
        model: the teacher weights, a transformers causal LM; whatever the caller keeps (an EMA copy, frozen
            initial weights, or the live student). Never modified; scored without gradients. None builds a teacher
            for `pairs` only (e.g. on a driver whose weights live in worker processes): `score` / `score_topk`
            then raise.
        tokenizer: its tokenizer (chat template applied to the teacher contexts when it has one).
        method: "credit" (aligned + M shuffled contexts, r = a - s - lam (beta - s)) or "sdpo" (aligned only,
            r = a - s).
        lam: CREDIT's debiasing weight in [0, 1] (0 = SDPO's reward, 1 = a - beta).
        num_partners: M, shuffled partner inputs per response, 1 <= M <= P - 1 (credit).
        baseline: beta over the M shuffled log-probs: "mean" or "logmeanexp".
        swap: "input" (partner prompt, own feedback) or "context" (the partner's whole teacher context).
        template: the teacher's reprompt. Any object with ``render(prompt: str, solution: str | None,
            feedback: str | None) -> str`` returning the teacher's user-turn text (``credit.TeacherTemplate``
            is one; braces in the arguments must be kept verbatim). The pipeline applies the chat template: for a
            message-list prompt, the rendered text replaces the content of the last user message.
        temperature: the teacher's softmax temperature (log-probs of softmax(logits / temperature)).
        seed: seed of the feedback choice and the partners, combined with the step.
        chat_template_kwargs: extra ``apply_chat_template`` arguments for the teacher contexts (e.g.
            ``{"enable_thinking": False}``).
        **scorer_options: passed to ``credit.TeacherScorer`` (backend, attn_backend, max_tokens, chunk_rows,
            check_inputs).

    Attributes:
        scorer: the TeacherScorer (its last_unique_tokens / last_total_tokens describe the last call); None when
            model is None.
    """

    def __init__(self, model, tokenizer, *, method: str = "credit", lam: float = 0.5, num_partners: int = 1,
                 baseline: str = "mean", swap: str = "input", template=DEFAULT_TEMPLATE, temperature: float = 1.0,
                 seed: int = 0, chat_template_kwargs=None, **scorer_options):
        fn = "CreditTeacher"
        if method not in METHODS:
            raise ValueError(f"{fn}: method must be one of {METHODS}; got {method!r}")
        options = dict(lam=lam, num_partners=num_partners, baseline=baseline, swap=swap)
        wrong = method_option_error(**options)
        if wrong:
            raise ValueError(f"{fn}: {wrong[0]} {wrong[1]}; got {options[wrong[0]]!r}")
        if not callable(getattr(template, "render", None)):
            raise TypeError(f"{fn}: template must have a render(prompt, solution, feedback) -> str method (e.g. a "
                            f"credit.TeacherTemplate); got {type(template).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"{fn}: seed must be an int; got {type(seed).__name__} {seed!r}")
        self.model, self.tokenizer = model, tokenizer
        self.method, self.lam, self.num_partners = method, float(lam), num_partners
        self.baseline, self.swap, self.template = baseline, swap, template
        self.temperature, self.seed = float(temperature), int(seed)
        self.chat_template_kwargs = chat_template_kwargs
        if model is None:
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
                raise ValueError(f"{fn}: temperature must be a number > 0; got {temperature!r}")
            self.scorer = None
        else:
            self.scorer = TeacherScorer(model, temperature=temperature, **scorer_options)

    # -- feedback, partners, contexts ----------------------------------------------------------------------------
    def pairs(self, batch: RolloutBatch, *, step: int, shard=None) -> TeacherPairs:
        """Feedback, partners and the aligned + shuffled teacher pairs of the shard's responses.

        Feedback and partners are drawn over the whole `batch`; the returned pairs index the shard's responses
        0..len(shard)-1 (shard order). shard=None: the whole batch.
        """
        if not isinstance(batch, RolloutBatch):
            raise TypeError(f"CreditTeacher: batch must be a credit.RolloutBatch; got {type(batch).__name__}")
        _check_step(step)
        texts = batch.texts
        if texts is None:
            texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in batch.response_ids]
        sel = select_feedback(batch.group_ids, batch.success, texts, batch.feedback, seed=self.seed * 31 + step)
        part = None
        if self.method == "credit":
            part = draw_partners(batch.group_ids, self.num_partners, seed=partner_draw_seed(self.seed, step))
        pairs = build_teacher_pairs(self.tokenizer, batch.prompts, batch.group_ids, batch.response_ids,
                                    sel.solutions, sel.feedbacks, part, swap=self.swap, template=self.template,
                                    chat_template_kwargs=self.chat_template_kwargs)
        rows = _shard_rows(shard, len(batch))
        if rows is None:
            return pairs
        local = {i: r for r, i in enumerate(rows)}

        def keep(plist):
            return [(local[i], c) for i, c in plist if i in local]

        return TeacherPairs(pairs.contexts, keep(pairs.pairs_aligned), [keep(p) for p in pairs.pairs_shuffled],
                            [pairs.responses_ids[i] for i in rows], [pairs.mask[i] for i in rows])

    # -- token level ---------------------------------------------------------------------------------------------
    def score(self, batch: RolloutBatch | None = None, *, step: int | None = None, shard=None,
              width: int | None = None, device=None, pairs: TeacherPairs | None = None) -> TeacherLogprobs:
        """Aligned and shuffled teacher log-probs of the shard's responses, all pairs in ONE scorer call.

        Args:
            batch: the (global) rollout batch.
            step: the training step (seeds the feedback choice and the partners).
            shard: indices (list, range, slice or 1-D tensor) of the responses this process scores; None = all.
            width: T, the padded response length (default max(1, longest scored response)).
            device: where the results go (default the teacher model's device).
            pairs: caller-built `credit.TeacherPairs` to score instead of ``self.pairs(batch, step=, shard=)``
                (a trainer with its own context rules); then batch and shard must be None (step is unused), and
                the rows are pairs.responses_ids' B responses.

        Returns:
            TeacherLogprobs(aligned [B, T], shuffled [M, B, T], response_mask [B, T], teacher_mask [B]), B = the
            shard's size; 0 where a response has no teacher signal.
        """
        pairs = self._given_or_built("CreditTeacher.score", batch, step, shard, pairs)
        lengths = [len(r) for r in pairs.responses_ids]
        width = _width(width, lengths)
        device = _model_device(self.model) if device is None else torch.device(device)
        scores = self.scorer.score_teacher_pairs(pairs)
        tables = []
        for plist, values in zip([pairs.pairs_aligned, *pairs.pairs_shuffled], [scores.aligned, *scores.shuffled]):
            table = torch.zeros((len(lengths), width), dtype=torch.float32, device=device)
            for (i, _), v in zip(plist, values):
                table[i, : v.numel()] = v.to(device)
            tables.append(table)
        shuffled = torch.stack(tables[1:]) if len(tables) > 1 else tables[0].new_zeros((0, len(lengths), width))
        return TeacherLogprobs(tables[0], shuffled, _response_mask(lengths, width, device),
                               torch.tensor(pairs.mask, dtype=torch.bool, device=device))

    def rewards(self, scores: TeacherLogprobs, student_logprobs: torch.Tensor,
                mask: torch.Tensor | None = None) -> TokenRewards:
        """Token rewards and per-sequence diagnostics from teacher and student log-probs.

        Args:
            scores: `score`'s result (or rows of it, ``scores[idx]``).
            student_logprobs: [B, T] float student log-probs s of the same tokens (detached: rewards are
                advantages).
            mask: [B, T] tokens to reward (default scores.response_mask); multiplied by the teacher mask.

        Returns:
            TokenRewards. credit runs the fused ``credit_kernels.credit_reward`` op (rewards, pMI, contrastive pMI
            and its surrogate in one pass); sdpo gives r = a - s and pMI = sum_t r.
        """
        if not isinstance(scores, TeacherLogprobs):
            raise TypeError(f"CreditTeacher.rewards: scores must be a TeacherLogprobs; got {type(scores).__name__}")
        if not isinstance(student_logprobs, torch.Tensor) or student_logprobs.shape != scores.aligned.shape:
            got = tuple(student_logprobs.shape) if isinstance(student_logprobs, torch.Tensor) else \
                type(student_logprobs).__name__
            raise ValueError(f"CreditTeacher.rewards: student_logprobs must be a tensor of shape "
                             f"{tuple(scores.aligned.shape)} (as scores.aligned); got {got}")
        mask = scores.response_mask if mask is None else mask
        mask = mask * scores.teacher_mask[:, None]
        if self.method == "sdpo":
            r = sdpo_rewards(scores.aligned, student_logprobs, mask)
            return TokenRewards(r, mask, r.sum(1), None, None, scores.teacher_mask, sdpo=r)
        out = credit_reward(scores.aligned, scores.shuffled, student_logprobs, mask, lam=self.lam,
                            baseline=self.baseline)
        with torch.no_grad():  # the two terms r = (1 - lam) sdpo + lam contrast, for display
            b = scores.shuffled.float()
            beta = b.mean(0) if self.baseline == "mean" else torch.logsumexp(b, 0) - math.log(b.shape[0])
            keep = mask != 0
            a, s = scores.aligned.float(), student_logprobs.detach().float()
            sdpo = torch.where(keep, a - s, torch.zeros_like(a))
            contrast = torch.where(keep, a - beta, torch.zeros_like(a))
        return TokenRewards(out.rewards, mask, out.pmi, out.contrastive_pmi, out.contrastive_pmi_surrogate,
                            scores.teacher_mask, sdpo=sdpo, contrast=contrast)

    # -- logit level ---------------------------------------------------------------------------------------------
    def score_topk(self, batch: RolloutBatch | None = None, ids=None, *, step: int | None = None, shard=None,
                   device=None, student_logp=None, student_tail=None, pairs: TeacherPairs | None = None,
                   add_tail: bool = True) -> TopkTeacher:
        """Teacher log-probs and tail at the student's top-k ids, aligned and shuffled, in one scorer call.

        Args:
            batch, step, shard, device, pairs: as in `score` (with pairs=, ids follow pairs.responses_ids).
            ids: the student's ids per response position: a [N, k] integer tensor in (response, token) order over
                the shard's responses (N = their total length), or one [L_i, k] tensor per response.
            student_logp, student_tail: optional [N, k] / [N] student log-probs at the ids and its tail; given,
                the result's ``target`` holds the distillation target over all rows (see `topk_target`).
            add_tail: passed to `topk_target` for ``target``.

        Returns:
            TopkTeacher (flat rows, 0 where a response has no teacher signal).
        """
        fn = "CreditTeacher.score_topk"
        pairs = self._given_or_built(fn, batch, step, shard, pairs)
        if ids is None:
            raise ValueError(f"{fn}: ids (the student's top-k ids per response position) is required")
        lengths = [len(r) for r in pairs.responses_ids]
        total = sum(lengths)
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 2 or ids.shape[0] != total:
                raise ValueError(f"{fn}: ids must be a [N, k] tensor with N = {total} (the responses' tokens); got "
                                 f"{tuple(ids.shape)}")
            per_response = list(ids.split(lengths))
        elif isinstance(ids, Sequence) and len(ids) == len(lengths):
            per_response = [torch.as_tensor(x) for x in ids]
            for i, (x, n) in enumerate(zip(per_response, lengths)):
                if x.dim() != 2 or x.shape[0] != n:
                    raise ValueError(f"{fn}: ids[{i}] must have shape [{n}, k]; got {tuple(x.shape)}")
            ids = torch.cat(per_response) if per_response else torch.zeros((0, 1), dtype=torch.long)
        else:
            raise ValueError(f"{fn}: ids must be a [N, k] tensor or {len(lengths)} per-response [L_i, k] tensors")
        k = int(ids.shape[1])
        device = _model_device(self.model) if device is None else torch.device(device)
        groups = [pairs.pairs_aligned, *pairs.pairs_shuffled]
        flat = [p for grp in groups for p in grp]
        scored = self.scorer.score_topk(pairs.contexts, pairs.responses_ids, flat, [per_response[i] for i, _ in flat])
        offsets = [0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()
        tables, q = [], 0
        for grp in groups:
            logp = torch.zeros((total, k), device=device)
            tail = torch.zeros((total,), device=device)
            for i, _ in grp:
                logp[offsets[i]:offsets[i + 1]] = scored.logp[q].to(device)
                tail[offsets[i]:offsets[i + 1]] = scored.tail[q].to(device)
                q += 1
            tables.append((logp, tail))
        teacher_mask = torch.tensor(pairs.mask, dtype=torch.bool, device=device)
        row_mask = teacher_mask.repeat_interleave(torch.tensor(lengths, dtype=torch.long, device=device))
        if len(tables) > 1:
            sh_logp = torch.stack([t[0] for t in tables[1:]])
            sh_tail = torch.stack([t[1] for t in tables[1:]])
        else:
            sh_logp, sh_tail = tables[0][0].new_zeros((0, total, k)), tables[0][1].new_zeros((0, total))
        out = TopkTeacher(tables[0][0], tables[0][1], sh_logp, sh_tail, row_mask, offsets, teacher_mask)
        if student_logp is not None:
            out.target = self.topk_target(out, student_logp, student_tail, add_tail=add_tail)
        return out

    def topk_target(self, topk: TopkTeacher, student_logp: torch.Tensor,
                    student_tail: torch.Tensor | None = None, *, add_tail: bool = True) -> ContrastiveTeacher:
        """The logit-level distillation target on `topk`'s rows (e.g. ``topk.rows(sel)``).

        credit: the contrastive teacher log T~ = log T + lam * (s - beta), renormalised over the top-k + tail
        buckets (``credit.contrastive_teacher_topk``); sdpo: the aligned teacher's log-probs and tail.
        student_logp [n, k] and student_tail [n] are detached here. add_tail=False: the buckets are the top-k
        renormalised (no tail; ``tail_logp`` is None and student_tail must be None).
        """
        if not add_tail:
            if student_tail is not None:
                raise ValueError("CreditTeacher.topk_target: student_tail was given but add_tail=False")
            if self.method == "sdpo":
                return ContrastiveTeacher(topk.logp - torch.logsumexp(topk.logp, dim=-1, keepdim=True), None)
            return contrastive_teacher_topk(topk.logp, topk.shuffled_logp, student_logp.detach(), lam=self.lam,
                                            baseline=self.baseline, add_tail=False)
        if self.method == "sdpo":
            return ContrastiveTeacher(topk.logp, topk.tail)
        return contrastive_teacher_topk(
            topk.logp, topk.shuffled_logp, student_logp.detach(), lam=self.lam, baseline=self.baseline,
            teacher_tail=topk.tail, shuffled_tail=topk.shuffled_tail,
            student_tail=None if student_tail is None else student_tail.detach(),
        )

    def _given_or_built(self, fn: str, batch, step, shard, pairs) -> TeacherPairs:
        """The caller's pairs (checked), or ``self.pairs(batch, step=step, shard=shard)``; needs the model."""
        if self.model is None:
            raise ValueError(f"{fn}: this CreditTeacher was built with model=None (for pairs() only); pass the "
                             f"teacher model to CreditTeacher(model, ...) to score")
        if pairs is None:
            return self.pairs(batch, step=step, shard=shard)
        if not isinstance(pairs, TeacherPairs):
            raise TypeError(f"{fn}: pairs must be a credit.TeacherPairs; got {type(pairs).__name__}")
        if batch is not None or shard is not None:
            raise ValueError(f"{fn}: pairs= replaces batch (and shard); pass either pairs or batch, not both")
        return pairs


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------
def _check_step(step) -> None:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"CreditTeacher: step must be an int >= 0; got {step!r}")


def _shard_rows(shard, num: int) -> list[int] | None:
    """shard -> the list of response indices (None: the whole batch)."""
    if shard is None:
        return None
    if isinstance(shard, slice):
        return list(range(num))[shard]
    if isinstance(shard, torch.Tensor):
        if shard.dim() != 1 or shard.is_floating_point() or shard.dtype == torch.bool:
            raise ValueError(f"CreditTeacher: shard must be a 1-D integer index tensor; got {shard.dtype} of shape "
                             f"{tuple(shard.shape)}")
        shard = shard.tolist()
    rows = []
    for r in shard:
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 0 <= r < num:
            raise ValueError(f"CreditTeacher: shard must hold response indices in [0, {num}); got {r!r}")
        rows.append(int(r))
    if len(set(rows)) != len(rows):
        raise ValueError("CreditTeacher: shard holds a response index twice")
    return rows


def _width(width, lengths: list[int]) -> int:
    longest = max(lengths, default=0)
    if width is None:
        return max(1, longest)
    if isinstance(width, bool) or not isinstance(width, int) or width < longest:
        raise ValueError(f"CreditTeacher: width must be an int >= the longest response ({longest}); got {width!r}")
    return width


def _response_mask(lengths: list[int], width: int, device) -> torch.Tensor:
    return (torch.arange(width, device=device)[None, :]
            < torch.tensor(lengths, dtype=torch.long, device=device)[:, None]).float()


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
