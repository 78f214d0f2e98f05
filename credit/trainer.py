"""The compact CREDIT training loop: one file, one device, read top to bottom.

    credit train                                        # embedded SmolLM2-135M, task 'largest', CREDIT, CPU ok
    credit train --method sdpo --max-steps 40 --output runs/sdpo
    credit train --task code --data my.jsonl --model /path/to/qwen --device cuda
    credit train --output runs/credit --resume          # continue a killed run exactly

One step (CREDIT.md): sample G rollouts for each of P prompts -> score them with the environment ->
feedback (a successful sibling and/or the environment's text) and teacher contexts c(x, f), aligned and
with M shuffled partner inputs -> teacher log-probs a and b through `TeacherScorer` (prefix-shared) ->
token rewards (GRPO / SDPO / CREDIT) -> policy-gradient update of the student -> EMA teacher -> log ->
evaluate -> checkpoint. Data order, rollouts and partners are seeded by (seed, step), so a resumed run
repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass

import torch

from credit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from credit.config import TrainConfig, patch_missing_config_keys
from credit.envs import get_task, load_jsonl
from credit.evaluation import cached_evaluation, evaluate, evaluate_heldout, prompt_ids  # noqa: F401 (re-exported)
from credit.logger import RunLogger, plot_curves
from credit.losses import (
    contrastive_teacher_topk,
    grpo_advantages,
    mix_advantages,
    policy_gradient_loss,
    topk_divergence,
)
from credit.models import hidden_states, lm_head_weight, load_model, resolve_device, resolve_dtype
from credit.pairing import partners as draw_partners
from credit.rewards import sdpo_rewards
from credit.rollouts import HFSampler, left_pad, make_sampler
from credit.scorer import TeacherScorer
from credit.templates import build_teacher_pairs, select_feedback
from credit_kernels import credit_reward, linear_gather, linear_logprob, linear_topk

# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def load_records(cfg: TrainConfig, env) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records: a synthetic task's seeded split, or JSONL files."""
    if cfg.data:
        train = _read_jsonl("--data", cfg.data, cfg.task)
        heldout = _read_jsonl("--eval-data", cfg.eval_data, cfg.task) if cfg.eval_data else []
    elif hasattr(env, "splits"):
        split = env.splits(seed=cfg.seed, n_heldout=cfg.n_heldout or None)
        train, heldout = split.train, split.heldout
        if cfg.eval_data:
            heldout = _read_jsonl("--eval-data", cfg.eval_data, cfg.task)
    else:
        raise ValueError(f"--task {cfg.task} reads its records from a file: pass --data path.jsonl")
    if len(train) < cfg.prompts_per_step:
        raise ValueError(f"--data: {len(train)} training records, fewer than prompts_per_step={cfg.prompts_per_step}")
    return train, heldout[: cfg.eval_max] if cfg.eval_max else heldout


def _read_jsonl(flag: str, path: str, task: str) -> list[dict]:
    """load_jsonl with errors that name the flag the file came from."""
    try:
        return load_jsonl(path, task)
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: no such file") from None
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


def step_records(train: list[dict], step: int, num: int, seed: int) -> list[dict]:
    """The `num` records of `step`: epochs of a seeded permutation, so the data position is the step."""
    out = []
    for k in range(step * num, (step + 1) * num):
        epoch, i = divmod(k, len(train))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(train[int(order[i])])
    return out


# ---------------------------------------------------------------------------------------------
# rollouts
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# teacher scoring and rewards
# ---------------------------------------------------------------------------------------------


def _pad_rows(rows: list[torch.Tensor], width: int, device) -> torch.Tensor:
    out = torch.zeros((len(rows), width), dtype=torch.float32, device=device)
    for r, v in enumerate(rows):
        out[r, : v.numel()] = v.to(device)
    return out


def teacher_logprobs(scorer, pairs, num_responses: int, width: int, device):
    """aligned [B, T] and shuffled [M, B, T] teacher log-probs (0 where a response has no pairs).

    The one call site of teacher scoring: every aligned and shuffled sequence goes through one prefix trie.
    """
    scores = scorer.score_teacher_pairs(pairs)
    tables = []
    for plist, values in zip([pairs.pairs_aligned, *pairs.pairs_shuffled], [scores.aligned, *scores.shuffled]):
        row = [torch.zeros(0)] * num_responses
        for (i, _), v in zip(plist, values):
            row[i] = v
        tables.append(_pad_rows(row, width, device))
    shuffled = torch.stack(tables[1:]) if len(tables) > 1 else tables[0].new_zeros((0, num_responses, width))
    return tables[0], shuffled


@dataclass
class Batch:
    """One step's rollouts, padded to T response tokens."""

    prompts: list[list[int]]        # [B] prompt ids (repeated per group)
    responses: list[list[int]]      # [B] response ids
    group_ids: torch.Tensor         # [B]
    outcome: torch.Tensor           # [B] environment reward
    success: torch.Tensor           # [B] bool
    response_mask: torch.Tensor     # [B, T] float
    texts: list[str]
    feedback: list[str | None]


def token_rewards(cfg: TrainConfig, batch: Batch, a, b, s, teacher_mask):
    """[B, T] token rewards for sdpo/credit (0 where the teacher has no signal), the mask, and diagnostics.

    CREDIT goes through the fused `credit_reward` op: rewards and per-sequence pMI sums in one pass.
    """
    mask = batch.response_mask * teacher_mask[:, None]
    rows = teacher_mask
    if cfg.method == "sdpo":
        r = sdpo_rewards(a, s, mask)
        diag = {"credit/pmi": (r.sum(1)[rows].mean().item())} if rows.any() else {}
        return r, mask, diag
    out = credit_reward(a, b, s, mask, lam=cfg.lam, baseline=cfg.baseline)
    diag = {}
    if rows.any():
        diag = {"credit/pmi": out.pmi[rows].mean().item(),
                "credit/contrastive_pmi": out.contrastive_pmi[rows].mean().item(),
                "credit/contrastive_pmi_surrogate": out.contrastive_pmi_surrogate[rows].mean().item()}
    return out.rewards, mask, diag


# ---------------------------------------------------------------------------------------------
# the update
# ---------------------------------------------------------------------------------------------


def _sequences(batch: Batch, idx: list[int], device):
    """Padded prompt+response ids and, per response position, the target each position predicts."""
    seqs = [batch.prompts[i] + batch.responses[i] for i in idx]
    ids, attn = left_pad(seqs, 0, device)
    width = batch.response_mask.shape[1]
    targets = torch.full_like(ids, -100)
    for r, i in enumerate(idx):
        n = len(batch.responses[i])
        if n:  # position L-1-n+t predicts response token t
            targets[r, ids.shape[1] - n - 1: ids.shape[1] - 1] = ids[r, ids.shape[1] - n:]
    return ids, attn, targets, width


def _response_rows(model, batch: Batch, idx: list[int], device):
    """Hidden states at the positions that predict response tokens, in (response, token) order, and the targets.

    Left padding puts every response at the end of its row, so a row-major boolean gather yields response r's
    tokens in order, responses in the order of idx.
    """
    ids, attn, targets, _ = _sequences(batch, idx, device)
    hidden = hidden_states(model, ids, attn)
    keep = targets != -100
    return hidden[keep], targets[keep]


def _to_padded(rows: torch.Tensor, lengths: list[int], width: int) -> torch.Tensor:
    """[sum(lengths), ...] rows in (response, token) order -> [len(lengths), width, ...], zeros beyond each length."""
    out = rows.new_zeros((len(lengths), width, *rows.shape[1:]))
    keep = torch.arange(width, device=rows.device)[None, :] < torch.tensor(lengths, device=rows.device)[:, None]
    out[keep] = rows
    return out


def student_logprobs(model, batch: Batch, idx: list[int], device) -> torch.Tensor:
    """[len(idx), T] student log-probs of the response tokens (with grad when enabled)."""
    rows, targets = _response_rows(model, batch, idx, device)
    logp = linear_logprob(rows, lm_head_weight(model).to(rows.dtype), targets)
    return _to_padded(logp, [len(batch.responses[i]) for i in idx], batch.response_mask.shape[1])


def update(model, optimizer, cfg: TrainConfig, batch: Batch, micro_loss, total_tokens) -> dict:
    """One optimizer step on the token mean over the whole batch, accumulated over micro-batches.

    micro_loss(idx) -> (token-mean loss of those responses, its number of tokens); total_tokens = the batch's.
    """
    num = len(batch.responses)
    optimizer.zero_grad(set_to_none=True)
    model.train()
    loss_sum = 0.0
    for start in range(0, num, cfg.micro_batch):
        idx = list(range(start, min(num, start + cfg.micro_batch)))
        loss, n_tokens = micro_loss(idx)
        if n_tokens == 0:
            continue
        loss = loss * (n_tokens / max(total_tokens, 1.0))  # micro token mean -> batch token mean
        loss.backward()
        loss_sum += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e30)
    optimizer.step()
    return {"train/loss": loss_sum, "train/grad_norm": float(grad_norm)}


def pg_loss_fn(model, cfg: TrainConfig, batch: Batch, advantage_fn, device):
    """micro_loss for token-level methods: the policy gradient with advantage_fn(idx, s) -> (A, mask)."""

    def micro_loss(idx):
        s = student_logprobs(model, batch, idx, device)
        adv, mask = advantage_fn(idx, s.detach())
        return policy_gradient_loss(s, adv, mask, is_clip=cfg.is_clip), float(mask.sum())

    return micro_loss


@torch.no_grad()
def ema_update(teacher, student, rate: float) -> None:
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.lerp_(ps.detach().to(pt.dtype), rate)


# ---------------------------------------------------------------------------------------------
# one step
# ---------------------------------------------------------------------------------------------


def rollout(cfg: TrainConfig, step: int, student, tokenizer, env, train: list[dict], sampler=None):
    """Sample and score P x G responses with `sampler` (default: transformers generate on the student);
    returns (Batch, records, seconds spent in generate (incl. the weight sync) and env)."""
    t0 = time.perf_counter()
    records = step_records(train, step, cfg.prompts_per_step, cfg.seed)
    prompts = [prompt_ids(tokenizer, env, r) for r in records]
    sampler = HFSampler(student, tokenizer, cfg) if sampler is None else sampler
    sampler.sync_weights(student)  # vLLM: push this step's weights; hf: generate runs on the student itself
    t_sync = time.perf_counter()
    # rollouts are a function of (seed, step): exact resume
    responses = sampler.sample(prompts, cfg.rollouts_per_prompt, greedy=False, seed=cfg.seed * 1_000_003 + step)
    g = cfg.rollouts_per_prompt
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    t1 = time.perf_counter()
    outcomes = [env.score(records[i // g], t) for i, t in enumerate(texts)]
    times = {"time/generate": t1 - t0, "time/sync_weights": t_sync - t0, "time/env": time.perf_counter() - t1}
    width = max(1, max(len(r) for r in responses))
    mask = torch.zeros((len(responses), width))
    for i, r in enumerate(responses):
        mask[i, : len(r)] = 1.0
    batch = Batch(
        prompts=[prompts[i // g] for i in range(len(responses))], responses=responses,
        group_ids=torch.arange(len(records)).repeat_interleave(g),
        outcome=torch.tensor([o.reward for o in outcomes], dtype=torch.float32),
        success=torch.tensor([o.success for o in outcomes]), response_mask=mask, texts=texts,
        feedback=[o.feedback for o in outcomes],
    )
    return batch, records, times


def teacher_pairs(cfg: TrainConfig, step: int, batch: Batch, records, env, tokenizer):
    """Feedback (a successful sibling and/or the environment's text) and the aligned + shuffled teacher pairs."""
    sel = select_feedback(batch.group_ids, batch.success, batch.texts, batch.feedback, seed=cfg.seed * 31 + step)
    part = None
    if cfg.method == "credit":
        part = draw_partners(batch.group_ids, cfg.num_partners, seed=cfg.seed * 17 + step)
    g = cfg.rollouts_per_prompt
    messages = [[{"role": "user", "content": env.make_prompt(records[i // g])}] for i in range(len(batch.texts))]
    return build_teacher_pairs(tokenizer, messages, batch.group_ids, batch.responses, sel.solutions, sel.feedbacks,
                               part, swap=cfg.swap)


def topk_loss_fn(cfg: TrainConfig, student, batch: Batch, pairs, scorer, teacher_mask, device):
    """micro_loss for --level topk: a divergence between the student and the (contrastive) teacher over the
    student's top-k ids + tail at every response position (CREDIT.md, "Logit-level variant")."""
    lengths = [len(r) for r in batch.responses]
    weight = lm_head_weight(student)
    ids = []
    with torch.no_grad():  # 1. the student's top-k ids, (response, token) order
        for start in range(0, len(lengths), cfg.micro_batch):
            rows, _ = _response_rows(student, batch, list(range(start, min(len(lengths), start + cfg.micro_batch))),
                                     device)
            ids.append(linear_topk(rows, weight.to(rows.dtype), cfg.topk).ids)
    ids = torch.cat(ids)
    per_response = list(ids.split(lengths))
    # 2. the teacher's log-probs (+ tail) at those ids, aligned and shuffled pairs in one trie
    groups = [pairs.pairs_aligned, *pairs.pairs_shuffled]
    flat = [p for grp in groups for p in grp]
    scored = scorer.score_topk(pairs.contexts, pairs.responses_ids, flat, [per_response[i] for i, _ in flat])
    offsets = [0] + list(torch.tensor(lengths).cumsum(0).tolist())
    tables, k = [], 0
    for grp in groups:
        logp = torch.zeros((offsets[-1], cfg.topk), device=device)
        tail = torch.zeros((offsets[-1],), device=device)
        for i, _ in grp:
            logp[offsets[i]:offsets[i + 1]] = scored.logp[k].to(device)
            tail[offsets[i]:offsets[i + 1]] = scored.tail[k].to(device)
            k += 1
        tables.append((logp, tail))
    keep_rows = teacher_mask.repeat_interleave(torch.tensor(lengths, device=device))

    def micro_loss(idx):
        sel = slice(offsets[idx[0]], offsets[idx[-1] + 1])
        keep = keep_rows[sel]
        if not keep.any():
            return None, 0.0
        rows, _ = _response_rows(student, batch, idx, device)
        s = linear_gather(rows[keep], weight.to(rows.dtype), ids[sel][keep], tail=True)
        t_logp, t_tail = tables[0][0][sel][keep], tables[0][1][sel][keep]
        if cfg.method == "credit":  # log T~ = log T + lam (s - beta), renormalised
            ct = contrastive_teacher_topk(
                t_logp, torch.stack([b[0][sel][keep] for b in tables[1:]]), s.logp.detach(), lam=cfg.lam,
                baseline=cfg.baseline, teacher_tail=t_tail, shuffled_tail=torch.stack([b[1][sel][keep] for b in tables[1:]]),
                student_tail=s.tail.detach(),
            )
            t_logp, t_tail = ct.topk_logp, ct.tail_logp
        div = topk_divergence(s.logp, t_logp, torch.ones_like(keep[keep]), alpha=cfg.alpha, student_tail=s.tail,
                              teacher_tail=t_tail)
        return div.loss, float(keep.sum())

    return micro_loss, float(keep_rows.sum())


def train_step(cfg: TrainConfig, step: int, student, tokenizer, env, train, scorer, optimizer, sampler=None) -> dict:
    """One step: rollouts (through `sampler`, default transformers generate) -> (teacher pass) -> update.
    Returns the step's metrics."""
    device = next(student.parameters()).device
    batch, records, times = rollout(cfg, step, student, tokenizer, env, train, sampler)
    t1 = time.perf_counter()
    batch.response_mask = batch.response_mask.to(device)
    grpo = grpo_advantages(batch.outcome, batch.group_ids).to(device)
    metrics = {"reward/outcome": batch.outcome.mean().item(), "train/accuracy": batch.success.float().mean().item(),
               "train/response_len": batch.response_mask.sum(1).mean().item()}
    if hasattr(env, "uses_shortcut"):  # the planted input-generic shortcut of largest_shortcut
        metrics["task/shortcut_rate"] = sum(map(env.uses_shortcut, batch.texts)) / len(batch.texts)
    rewards = None
    if cfg.method == "grpo":
        mask = batch.response_mask
        micro_loss = pg_loss_fn(student, cfg, batch, lambda idx, s: (grpo[idx, None] * mask[idx], mask[idx]), device)
        total = float(mask.sum())
        t2 = time.perf_counter()
    else:
        pairs = teacher_pairs(cfg, step, batch, records, env, tokenizer)
        teacher_mask = torch.tensor(pairs.mask, dtype=torch.bool, device=device)
        if cfg.level == "topk":
            micro_loss, total = topk_loss_fn(cfg, student, batch, pairs, scorer, teacher_mask, device)
        else:
            a, b = teacher_logprobs(scorer, pairs, len(batch.responses), batch.response_mask.shape[1], device)
            s_seen = torch.zeros_like(batch.response_mask)
            advantage_fn, loss_mask = _distill_advantages(cfg, student, batch, a, b, teacher_mask, grpo, s_seen)
            micro_loss, total = pg_loss_fn(student, cfg, batch, advantage_fn, device), float(loss_mask.sum())
            rewards = (a, b, s_seen, teacher_mask)
        t2 = time.perf_counter()
        metrics["teacher/mask_frac"] = teacher_mask.float().mean().item()
        metrics["scorer/unique_ratio"] = scorer.last_unique_tokens / max(1, scorer.last_total_tokens)

    metrics.update(update(student, optimizer, cfg, batch, micro_loss, total))
    t3 = time.perf_counter()
    if rewards is not None:
        r, mask, diag = token_rewards(cfg, batch, *rewards)
        metrics.update(diag)
        metrics["reward/token_mean"] = (r.sum() / mask.sum().clamp(min=1)).item()
    metrics.update({**times, "time/teacher": t2 - t1, "time/update": t3 - t2})
    metrics["_batch"] = batch  # for samples; removed before logging
    metrics["_rewards"] = rewards
    return metrics


def _distill_advantages(cfg: TrainConfig, student, batch: Batch, a, b, teacher_mask, grpo, s_seen):
    """advantage_fn for sdpo/credit: token rewards from (a, b, s), mixed with GRPO when mu > 0.

    Rewards are per token, so each micro-batch computes its own from the s of its forward (detached), and
    records it in s_seen for the diagnostics. Batch-level normalisation needs every s first: one extra
    no-grad forward, only then.
    """
    loss_mask = batch.response_mask if cfg.mu > 0 else batch.response_mask * teacher_mask[:, None]
    if cfg.normalize_rewards:
        with torch.no_grad():
            s_full = student_logprobs(student, batch, list(range(len(batch.responses))), grpo.device)
        r, _, _ = token_rewards(cfg, batch, a, b, s_full, teacher_mask)
        adv_full = mix_advantages(r, grpo, loss_mask, mu=cfg.mu, normalize=True)

        def from_batch(idx, s):
            s_seen[idx] = s
            return adv_full[idx], loss_mask[idx]

        return from_batch, loss_mask

    def per_micro_batch(idx, s):
        s_seen[idx] = s
        r, _, _ = token_rewards(cfg, _slice(batch, idx), a[idx], b[:, idx], s, teacher_mask[idx])
        return mix_advantages(r, grpo[idx], loss_mask[idx], mu=cfg.mu), loss_mask[idx]

    return per_micro_batch, loss_mask


def _slice(batch: Batch, idx: list[int]) -> Batch:
    return Batch(prompts=[batch.prompts[i] for i in idx], responses=[batch.responses[i] for i in idx],
                 group_ids=batch.group_ids[idx], outcome=batch.outcome[idx], success=batch.success[idx],
                 response_mask=batch.response_mask[idx], texts=[batch.texts[i] for i in idx],
                 feedback=[batch.feedback[i] for i in idx])


def save_samples(cfg: TrainConfig, step: int, tokenizer, batch: Batch, rewards) -> None:
    """Per-token SDPO and CREDIT rewards of one batch, for `credit viz`."""
    rows = []
    a, b, s, teacher_mask = rewards if rewards is not None else (None,) * 4
    for i, resp in enumerate(batch.responses):
        row = {"prompt": tokenizer.decode(batch.prompts[i], skip_special_tokens=True), "group": int(batch.group_ids[i]),
               "tokens": [tokenizer.decode([t]) for t in resp], "reward": float(batch.outcome[i]),
               "success": bool(batch.success[i]), "feedback": batch.feedback[i]}
        if a is not None and bool(teacher_mask[i]):
            n = len(resp)
            row["sdpo"] = (a[i, :n] - s[i, :n]).tolist()
            if b.shape[0]:
                beta = b[:, i, :n].mean(0)
                row["credit_contrast"] = (a[i, :n] - beta).tolist()
                row["credit"] = (a[i, :n] - s[i, :n] - cfg.lam * (beta - s[i, :n])).tolist()
        rows.append(row)
    os.makedirs(os.path.join(cfg.output, "samples"), exist_ok=True)
    with open(os.path.join(cfg.output, "samples", f"step_{step:06d}.json"), "w") as f:
        json.dump({"step": step, "method": cfg.method, "lam": cfg.lam, "responses": rows}, f)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

# fields that may differ between a checkpoint and the resuming command
_RESUMABLE = {"max_steps", "resume", "progress", "logger", "eval_every", "save_every", "sample_every", "device",
              "vllm_gpu_memory", "eval_cache"}


def _check_resume_config(saved: dict, cfg: TrainConfig) -> None:
    saved = patch_missing_config_keys(saved)
    diff = {k: (saved[k], v) for k, v in cfg.to_dict().items() if k not in _RESUMABLE and saved[k] != v}
    if diff:
        raise ValueError(f"--resume: the checkpoint was made with different settings {diff} (saved, now); resume "
                         "with the same flags or use a new --output")


@dataclass
class Run:
    """Everything a run holds: built by `setup`, used by `train` and by bench/bench_step.py."""

    env: object
    train_records: list
    heldout: list
    student: torch.nn.Module
    tokenizer: object
    teacher: torch.nn.Module | None   # None: the live student is the teacher
    scorer: TeacherScorer
    optimizer: torch.optim.Optimizer
    sampler: object                   # rollouts and evaluation: credit.rollouts.HFSampler or VLLMSampler


def setup(cfg: TrainConfig) -> Run:
    """Data first (bad files fail before anything is loaded or written), then model, teacher, optimizer."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    env = get_task(cfg.task)
    train_records, heldout = load_records(cfg, env)
    student, tokenizer = load_model(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device))
    teacher = None if cfg.teacher == "live" else copy.deepcopy(student).requires_grad_(False).eval()
    scorer = TeacherScorer(teacher if teacher is not None else student, max_tokens=cfg.score_max_tokens)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = make_sampler(cfg, student, tokenizer)  # after the student, so a vLLM engine sizes itself around it
    print(f"credit: rollouts with {sampler.name} (--rollout {cfg.rollout})")
    return Run(env, train_records, heldout, student, tokenizer, teacher, scorer, optimizer, sampler)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns a summary with held-out accuracy before and after."""
    run = setup(cfg)
    env, heldout, student, tokenizer, teacher = run.env, run.heldout, run.student, run.tokenizer, run.teacher
    optimizer, device = run.optimizer, next(run.student.parameters()).device
    start, history = 0, {"eval": []}
    ckpt = latest_checkpoint(cfg.output) if cfg.resume else None
    if cfg.resume and ckpt is None:
        print(f"credit: --resume but no checkpoint in {cfg.output}; starting from step 0")
    if ckpt is not None:
        state = load_checkpoint(ckpt, student=student, teacher=teacher, optimizer=optimizer, device=device)
        _check_resume_config(state["config"], cfg)
        start, history = state["step"], state["extra"].get("history", history)
        print(f"credit: resumed from {ckpt} (step {start})")
    logger = RunLogger(cfg.output, cfg.to_dict(), backend=cfg.logger, resume_step=start if ckpt else None)
    history.setdefault("eval_results", [])

    def held_out(step, res):  # greedy accuracy in history["eval"]; everything (sampled, intervals) beside it
        history["eval"].append((step, res.greedy))
        history["eval_results"].append((step, res.to_dict()))
        return res.metrics()

    if start == 0:
        res = cached_evaluation(cfg, heldout, lambda: evaluate_heldout(student, tokenizer, env, heldout, cfg,
                                                                       sampler=run.sampler), device=str(device))
        logger.log(0, held_out(0, res))
        print(f"held-out accuracy before training: {res.greedy:.3f} ({len(heldout)} records)")

    bar = _progress(cfg, start)
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()
        metrics = train_step(cfg, step, student, tokenizer, env, run.train_records, run.scorer, optimizer,
                             sampler=run.sampler)
        batch, rewards = metrics.pop("_batch"), metrics.pop("_rewards", None)
        if teacher is not None and cfg.teacher == "ema":
            ema_update(teacher, student, cfg.ema_rate)
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
            metrics.update(held_out(done, evaluate_heldout(student, tokenizer, env, heldout, cfg, sampler=run.sampler)))
        if cfg.sample_every and done % cfg.sample_every == 0:
            save_samples(cfg, done, tokenizer, batch, rewards)
        if done == cfg.max_steps:
            metrics.update(held_out(done, evaluate_heldout(student, tokenizer, env, heldout, cfg, sampler=run.sampler)))
        metrics["time/step"] = time.perf_counter() - t0
        logger.log(done, metrics)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps:
            save_checkpoint(cfg.output, done, student=student, teacher=teacher if cfg.teacher != "live" else None,
                            optimizer=optimizer, config=cfg.to_dict(), extra={"history": history})
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward/outcome']:.2f}", acc=f"{history['eval'][-1][1]:.2f}")
    bar.close()
    logger.finish()
    plot_curves(logger.path, os.path.join(cfg.output, "curves.png"), title=f"{cfg.method} on {cfg.task}")
    summary = {"method": cfg.method, "task": cfg.task, "steps": cfg.max_steps, "rollout": run.sampler.name,
               "accuracy_before": history["eval"][0][1] if history["eval"] and history["eval"][0][0] == 0 else None,
               "accuracy_after": history["eval"][-1][1] if history["eval"] else None, "eval": history["eval"],
               "eval_results": history["eval_results"]}
    with open(os.path.join(cfg.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"held-out accuracy: before {summary['accuracy_before']}, after {summary['accuracy_after']}; "
          f"curves in {os.path.join(cfg.output, 'curves.png')}")
    return summary


def _progress(cfg: TrainConfig, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=start, disable=not cfg.progress, desc=f"{cfg.method}", unit="step")
