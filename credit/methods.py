r"""The training methods of the compact loop, one small object each: its micro-batch loss and its diagnostics.

    grpo                      A_it = A_grpo(i) (group-normalised outcome reward)          policy gradient
    sdpo / credit, token      A_it = r_it from CreditTeacher.rewards (mixed: mu A_grpo + (1 - mu) r)   policy gradient
    sdpo / credit, topk       divergence between the student and the (contrastive) teacher over the student's
                              top-k ids + tail at every response position

The math is in docs/method.md. Every method reaches the student through ONE function, `student_forward` (hidden
states at the positions that predict response tokens); `student_logprobs` projects them with the fused
`linear_logprob`. A method object is built once per step, after the rollouts and before the update:

    method = make_method(cfg, teacher, student, batch, step, grpo)   # the teacher pass happens here
    loss, n_tokens = method.micro_loss(idx)                          # per micro-batch, with grad
    metrics, rewards = method.diagnostics()                          # after the update
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from credit.losses import mix_advantages, policy_gradient_loss, topk_divergence
from credit.models import hidden_states, lm_head_weight
from credit.packed_student import packed_response_rows, packed_unsupported, plan_packs
from credit.pipeline import CreditTeacher, RolloutBatch, TokenRewards
from credit.rollouts import left_pad
from credit_kernels import linear_gather, linear_logprob, linear_topk

__all__ = ["GRPO", "Batch", "TokenDistill", "TopkDistill", "make_method", "micro_batches", "student_forward",
           "student_logprobs"]


@dataclass
class Batch:
    """One step's rollouts: what the teacher sees (a RolloutBatch) plus what the student's forward needs."""

    rollout: RolloutBatch          # prompts (chat messages), response ids, group ids, success, feedback, outcome, texts
    prompt_ids: list[list[int]]    # [B] the student's prompt ids (chat template applied), repeated per group
    response_mask: torch.Tensor    # [B, T] float, 1 at response tokens
    share_prompts: bool = False    # the student's forward packs the prompt trie (credit.packed_student) if supported

    @property
    def responses(self) -> list[list[int]]:
        return self.rollout.response_ids

    def __len__(self) -> int:
        return len(self.rollout)


# ---------------------------------------------------------------------------------------------
# the student's forward: the one place the methods compute student log-probs
# ---------------------------------------------------------------------------------------------


def student_forward(model, batch: Batch, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [n, d] at the positions that predict the response tokens of responses `idx`, in (response,
    token) order, and the targets [n] (with grad when enabled).

    batch.share_prompts (--share-prompts, the default): ONE packed forward over the trie of the responses'
    prompts + responses, each shared prompt computed once (`credit.packed_student.packed_response_rows`; same values
    and gradients as the padded path, to float rounding), where the model family allows it
    (`packed_unsupported`); else, and with --no-share-prompts, the padded path: left padding puts every response
    at the end of its row, so a row-major boolean gather yields response r's tokens in order, responses in the
    order of idx.
    """
    prompts, responses = [batch.prompt_ids[i] for i in idx], [batch.responses[i] for i in idx]
    if batch.share_prompts and packed_unsupported(model, max(len(p) + len(r) for p, r in zip(prompts, responses))) \
            is None:
        rows = packed_response_rows(model, prompts, responses, check_inputs=False)
        return rows.hidden, rows.targets
    device = batch.response_mask.device
    ids, attn = left_pad([batch.prompt_ids[i] + batch.responses[i] for i in idx], 0, device)
    targets = torch.full_like(ids, -100)
    for r, i in enumerate(idx):
        n = len(batch.responses[i])
        if n:  # position L-1-n+t predicts response token t
            targets[r, ids.shape[1] - n - 1: ids.shape[1] - 1] = ids[r, ids.shape[1] - n:]
    hidden = hidden_states(model, ids, attn)
    keep = targets != -100
    return hidden[keep], targets[keep]


def micro_batches(batch: Batch, micro_batch: int) -> list[list[int]]:
    """The update's micro-batches: runs of `micro_batch` responses (padded), or with batch.share_prompts packs of
    whole groups whose trie holds at most micro_batch x the longest sequence tokens (the padded micro-batch's
    activation bound; `credit.packed_student.plan_packs`). Groups are contiguous, so both are contiguous runs."""
    num = len(batch)
    if not batch.share_prompts:
        return [list(range(a, min(num, a + micro_batch))) for a in range(0, num, micro_batch)]
    longest = max(len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.responses))
    return plan_packs(batch.prompt_ids, batch.responses, max_tokens=micro_batch * longest,
                      group_ids=batch.rollout.group_ids)


def student_logprobs(model, batch: Batch, idx: list[int]) -> torch.Tensor:
    """[len(idx), T] student log-probs s of the response tokens, 0 beyond each response (with grad when enabled)."""
    rows, targets = student_forward(model, batch, idx)
    logp = linear_logprob(rows, lm_head_weight(model).to(rows.dtype), targets)
    return _to_padded(logp, [len(batch.responses[i]) for i in idx], batch.response_mask.shape[1])


def _to_padded(rows: torch.Tensor, lengths: list[int], width: int) -> torch.Tensor:
    """[sum(lengths), ...] rows in (response, token) order -> [len(lengths), width, ...], zeros beyond each length."""
    out = rows.new_zeros((len(lengths), width, *rows.shape[1:]))
    keep = torch.arange(width, device=rows.device)[None, :] < torch.tensor(lengths, device=rows.device)[:, None]
    out[keep] = rows
    return out


# ---------------------------------------------------------------------------------------------
# the methods
# ---------------------------------------------------------------------------------------------


class GRPO:
    """Outcome advantages only: A_it = A_grpo(i) on every response token; no teacher."""

    def __init__(self, cfg, student, batch: Batch, grpo: torch.Tensor):
        self.cfg, self.student, self.batch = cfg, student, batch
        self.mask = batch.response_mask
        self.advantages = grpo[:, None] * self.mask  # [B, T]
        self.total_tokens = float(self.mask.sum())

    def micro_loss(self, idx: list[int]):
        s = student_logprobs(self.student, self.batch, idx)
        return policy_gradient_loss(s, self.advantages[idx], self.mask[idx], is_clip=self.cfg.is_clip), \
            float(self.mask[idx].sum())

    def diagnostics(self) -> tuple[dict, TokenRewards | None]:
        return {}, None


class TokenDistill:
    """sdpo / credit at token level: the policy gradient on the teacher's token rewards.

    Rewards are per token, so each micro-batch computes its own from the s of its forward (detached), and keeps
    it for the diagnostics. Batch-level normalisation (--normalize-rewards) needs every s first: one extra no-grad
    forward, only then. With mu > 0 responses without a teacher signal still get the outcome advantage.
    """

    def __init__(self, cfg, teacher: CreditTeacher, student, batch: Batch, step: int, grpo: torch.Tensor):
        self.cfg, self.teacher, self.student, self.batch, self.grpo = cfg, teacher, student, batch, grpo
        device = batch.response_mask.device
        self.scores = teacher.score(batch.rollout, step=step, width=batch.response_mask.shape[1], device=device)
        self.teacher_mask = self.scores.teacher_mask
        self.loss_mask = batch.response_mask if cfg.mu > 0 else self.scores.mask
        self.total_tokens = float(self.loss_mask.sum())
        self.s_seen = torch.zeros_like(batch.response_mask)
        self.advantages = None
        if cfg.normalize_rewards:
            with torch.no_grad():
                s_full = student_logprobs(student, batch, list(range(len(batch))))
            r = teacher.rewards(self.scores, s_full).rewards
            self.advantages = mix_advantages(r, grpo, self.loss_mask, mu=cfg.mu, normalize=True)

    def micro_loss(self, idx: list[int]):
        s = student_logprobs(self.student, self.batch, idx)
        self.s_seen[idx] = s.detach()
        if self.advantages is not None:
            adv = self.advantages[idx]
        else:
            r = self.teacher.rewards(self.scores[idx], s.detach()).rewards
            adv = mix_advantages(r, self.grpo[idx], self.loss_mask[idx], mu=self.cfg.mu)
        return policy_gradient_loss(s, adv, self.loss_mask[idx], is_clip=self.cfg.is_clip), \
            float(self.loss_mask[idx].sum())

    def diagnostics(self) -> tuple[dict, TokenRewards]:
        """The rewards the update used (from the s of its forwards) and their means: credit/pmi, ...,
        reward/token_mean."""
        rewards = self.teacher.rewards(self.scores, self.s_seen)
        metrics = rewards.metrics()
        metrics["reward/token_mean"] = (rewards.rewards.sum() / rewards.mask.sum().clamp(min=1)).item()
        return metrics, rewards


class TopkDistill:
    """sdpo / credit at logit level: topk_divergence(student, target) over the student's top-k ids + tail, the
    target being the aligned teacher (sdpo) or the contrastive teacher log T + lam (s - beta), renormalised
    (credit)."""

    def __init__(self, cfg, teacher: CreditTeacher, student, batch: Batch, step: int):
        self.cfg, self.teacher, self.student, self.batch = cfg, teacher, student, batch
        self.weight = lm_head_weight(student)
        ids = []
        with torch.no_grad():  # 1. the student's top-k ids, (response, token) order
            for idx in micro_batches(batch, cfg.micro_batch):
                rows, _ = student_forward(student, batch, idx)
                ids.append(linear_topk(rows, self.weight.to(rows.dtype), cfg.topk).ids)
        self.ids = torch.cat(ids)
        # 2. the teacher's log-probs (+ tail) at those ids, aligned and shuffled pairs in one trie
        self.topk = teacher.score_topk(batch.rollout, self.ids, step=step, device=batch.response_mask.device)
        self.teacher_mask = self.topk.teacher_mask
        self.total_tokens = float(self.topk.row_mask.sum())

    def micro_loss(self, idx: list[int]):
        offsets = self.topk.offsets
        sel = slice(offsets[idx[0]], offsets[idx[-1] + 1])
        keep = self.topk.row_mask[sel]
        if not keep.any():
            return None, 0.0
        rows, _ = student_forward(self.student, self.batch, idx)
        s = linear_gather(rows[keep], self.weight.to(rows.dtype), self.ids[sel][keep], tail=True)
        target = self.teacher.topk_target(self.topk.rows(sel).rows(keep), s.logp, s.tail)
        div = topk_divergence(s.logp, target.topk_logp, torch.ones_like(keep[keep]), alpha=self.cfg.alpha,
                              student_tail=s.tail, teacher_tail=target.tail_logp)
        return div.loss, float(keep.sum())

    def diagnostics(self) -> tuple[dict, TokenRewards | None]:
        return {}, None


def make_method(cfg, teacher: CreditTeacher | None, student, batch: Batch, step: int, grpo: torch.Tensor):
    """The step's method object for cfg.method / cfg.level (the teacher pass runs here)."""
    if cfg.method == "grpo":
        return GRPO(cfg, student, batch, grpo)
    if cfg.level == "topk":
        return TopkDistill(cfg, teacher, student, batch, step)
    return TokenDistill(cfg, teacher, student, batch, step, grpo)
