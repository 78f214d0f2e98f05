"""The compact CREDIT training loop: one file, one device, read top to bottom.

    credit train                                        # embedded SmolLM2-135M, task 'largest', CREDIT, CPU ok
    credit train --method sdpo --max-steps 40 --output runs/sdpo
    credit train --task code --data my.jsonl --model /path/to/qwen --device cuda
    credit train --output runs/credit --resume          # continue a killed run exactly

One step (docs/method.md): sample G rollouts for each of P prompts -> score them with the environment ->
the method's teacher pass, `credit.CreditTeacher` (feedback, M shuffled partner inputs, teacher contexts, one
prefix-shared scoring call; credit/pipeline.py) -> the method's micro-batch losses (credit/methods.py: GRPO,
token-level SDPO / CREDIT rewards through `CreditTeacher.rewards`, or the top-k divergence) -> update of the
student -> EMA teacher -> log -> evaluate -> checkpoint. Data order, rollouts and partners are seeded by
(seed, step), so a resumed run repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass

import torch

from credit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from credit.config import TrainConfig, patch_missing_config_keys, resumable_fields
from credit.envs import get_task, load_jsonl
from credit.evaluation import cached_evaluation, evaluate, evaluate_heldout, prompt_ids  # noqa: F401 (re-exported)
from credit.logger import RunLogger, plot_curves
from credit.losses import grpo_advantages
from credit.methods import Batch, make_method, micro_batches
from credit.models import load_model, resolve_device, resolve_dtype
from credit.packed_student import packed_unsupported
from credit.pipeline import CreditTeacher, RolloutBatch, TokenRewards
from credit.rollouts import HFSampler, make_sampler

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
# the update
# ---------------------------------------------------------------------------------------------


def update(model, optimizer, cfg: TrainConfig, batch: Batch, method) -> dict:
    """One optimizer step on the token mean over the whole batch, accumulated over micro-batches.

    method.micro_loss(idx) -> (token-mean loss of those responses, its number of tokens); method.total_tokens =
    the batch's.
    """
    optimizer.zero_grad(set_to_none=True)
    model.train()
    loss_sum = 0.0
    for idx in micro_batches(batch, cfg.micro_batch):  # packs of whole groups with --share-prompts
        loss, n_tokens = method.micro_loss(idx)
        if n_tokens == 0:
            continue
        loss = loss * (n_tokens / max(method.total_tokens, 1.0))  # micro token mean -> batch token mean
        loss.backward()
        loss_sum += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e30)
    optimizer.step()
    return {"train/loss": loss_sum, "train/grad_norm": float(grad_norm)}


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
    teacher_view = RolloutBatch(
        prompts=[[{"role": "user", "content": env.make_prompt(records[i // g])}] for i in range(len(responses))],
        response_ids=responses, group_ids=torch.arange(len(records)).repeat_interleave(g),
        success=torch.tensor([o.success for o in outcomes]), feedback=[o.feedback for o in outcomes],
        outcome=torch.tensor([o.reward for o in outcomes], dtype=torch.float32), texts=texts,
    )
    batch = Batch(teacher_view, prompt_ids=[prompts[i // g] for i in range(len(responses))], response_mask=mask,
                  share_prompts=cfg.share_prompts)
    return batch, records, times


def train_step(cfg: TrainConfig, step: int, student, tokenizer, env, train, teacher: CreditTeacher | None,
               optimizer, sampler=None):
    """One step: rollouts (through `sampler`, default transformers generate) -> the method's teacher pass
    (`CreditTeacher`; none for grpo) -> update. Returns (metrics, batch, rewards): rewards is the TokenRewards the
    token-level update used (None for grpo and --level topk)."""
    device = next(student.parameters()).device
    batch, records, times = rollout(cfg, step, student, tokenizer, env, train, sampler)
    t1 = time.perf_counter()
    batch.response_mask = batch.response_mask.to(device)
    rb = batch.rollout
    grpo = grpo_advantages(rb.outcome, rb.group_ids).to(device)
    metrics = {"reward/outcome": rb.outcome.mean().item(), "train/accuracy": rb.success.float().mean().item(),
               "train/response_len": batch.response_mask.sum(1).mean().item()}
    if hasattr(env, "uses_shortcut"):  # the planted input-generic shortcut of largest_shortcut
        metrics["task/shortcut_rate"] = sum(map(env.uses_shortcut, rb.texts)) / len(rb.texts)
    method = make_method(cfg, teacher, student, batch, step, grpo)  # feedback, partners, teacher scoring
    t2 = time.perf_counter()
    if teacher is not None:
        metrics["teacher/mask_frac"] = method.teacher_mask.float().mean().item()
        metrics["scorer/unique_ratio"] = teacher.scorer.last_unique_tokens / max(1, teacher.scorer.last_total_tokens)

    metrics.update(update(student, optimizer, cfg, batch, method))
    t3 = time.perf_counter()
    diag, rewards = method.diagnostics()  # the CREDIT / SDPO rewards the update used, and their means
    metrics.update(diag)
    metrics.update({**times, "time/teacher": t2 - t1, "time/update": t3 - t2})
    return metrics, batch, rewards


def save_samples(cfg: TrainConfig, step: int, tokenizer, batch: Batch, rewards: TokenRewards | None) -> None:
    """Per-token rewards of one batch, for `credit viz`: the reward the update used (`cfg.method`'s key) and, for
    credit, its two terms (sdpo = a - s, credit_contrast = a - beta with --baseline)."""
    rb = batch.rollout
    rows = []
    for i, resp in enumerate(rb.response_ids):
        row = {"prompt": tokenizer.decode(batch.prompt_ids[i], skip_special_tokens=True), "group": int(rb.group_ids[i]),
               "tokens": [tokenizer.decode([t]) for t in resp], "reward": float(rb.outcome[i]),
               "success": bool(rb.success[i]), "feedback": rb.feedback[i]}
        if rewards is not None and bool(rewards.teacher_mask[i]):
            n = len(resp)
            row[cfg.method] = rewards.rewards[i, :n].tolist()
            row["sdpo"] = rewards.sdpo[i, :n].tolist()
            if rewards.contrast is not None:
                row["credit_contrast"] = rewards.contrast[i, :n].tolist()
        rows.append(row)
    os.makedirs(os.path.join(cfg.output, "samples"), exist_ok=True)
    with open(os.path.join(cfg.output, "samples", f"step_{step:06d}.json"), "w") as f:
        json.dump({"step": step, "method": cfg.method, "lam": cfg.lam, "baseline": cfg.baseline, "responses": rows}, f)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def _check_resume_config(saved: dict, cfg: TrainConfig) -> None:
    saved = patch_missing_config_keys(saved)
    may_differ = resumable_fields()  # marked resumable=True in TrainConfig's field metadata
    diff = {k: (saved[k], v) for k, v in cfg.to_dict().items() if k not in may_differ and saved[k] != v}
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
    teacher: torch.nn.Module | None   # the teacher weights; None: the live student is the teacher
    credit_teacher: CreditTeacher | None  # the teacher pipeline (scoring + rewards); None for grpo
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
    credit_teacher = None
    if cfg.method != "grpo":
        credit_teacher = CreditTeacher(teacher if teacher is not None else student, tokenizer, method=cfg.method,
                                       lam=cfg.lam, num_partners=cfg.num_partners, baseline=cfg.baseline,
                                       swap=cfg.swap, seed=cfg.seed, max_tokens=cfg.score_max_tokens)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = make_sampler(cfg, student, tokenizer)  # after the student, so a vLLM engine sizes itself around it
    print(f"credit: rollouts with {sampler.name} (--rollout {cfg.rollout})")
    why = packed_unsupported(student) if cfg.share_prompts else None
    if why is not None:
        print(f"credit: --share-prompts: the student update runs padded ({why})")
    return Run(env, train_records, heldout, student, tokenizer, teacher, credit_teacher, optimizer, sampler)


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
        metrics, batch, rewards = train_step(cfg, step, student, tokenizer, env, run.train_records,
                                             run.credit_teacher, optimizer, sampler=run.sampler)
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
