"""Shared pieces of the TRL tests: a local tiny Llama (no hub), a toy dataset and reward, trainers and one batch.

Also run as a script by the two-process test (`accelerate launch ... tests/trl_harness.py --out f.pt`).
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

PROMPTS = [f"Question {i}: what is {i} plus {i + 1}? Answer:" for i in range(8)]


def feedback(prompts):
    """Environment feedback for every other prompt (TRL's `privileged_context` column), None elsewhere."""
    return [f"Your answer to #{i} was wrong." if i % 2 else None for i in range(len(prompts))]


def reward_parity(completions, **kwargs):
    """A deterministic toy outcome reward with successes and failures in most groups."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]  # conversational or plain
    return [float(sum(map(ord, t)) % 2) for t in texts]


def make_config(credit: bool, out_dir: str, **kw):
    """SDPOConfig / CreditSDPOConfig for CPU runs: 4 prompts x 2 generations per step unless overridden."""
    from trl.experimental.sdpo import SDPOConfig

    from credit.integrations.trl import CreditSDPOConfig

    base = dict(output_dir=out_dir, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                per_device_train_batch_size=8, num_generations=2, max_completion_length=8, max_steps=2,
                learning_rate=1e-2, seed=0, data_seed=0, success_reward_threshold=0.5,
                dont_reprompt_on_self_success=False,
                include_environment_feedback=True, teacher_model_kind="live", disable_tqdm=True,
                generation_kwargs={"do_sample": True})
    base.update(kw)
    if credit:
        return CreditSDPOConfig(**base)
    drop = ("lam", "num_partners", "baseline", "swap", "teacher_scoring", "partner_seed", "scorer_max_tokens",
            "share_prompts")
    return SDPOConfig(**{k: v for k, v in base.items() if k not in drop})


def make_trainer(credit: bool, model_dir: str, out_dir: str, prompts=PROMPTS, **kw):
    from datasets import Dataset
    from trl.experimental.sdpo import SDPOTrainer

    from credit.integrations.trl import CreditSDPOTrainer

    cls = CreditSDPOTrainer if credit else SDPOTrainer
    args = make_config(credit, out_dir, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model=model_dir, reward_funcs=reward_parity, args=args,
                   train_dataset=Dataset.from_dict({"prompt": list(prompts), "privileged_context": feedback(prompts)}))


def one_batch(trainer):
    """One training batch (rollouts, rewards, teacher contexts) of `trainer`, with a fixed sampling seed."""
    inputs = next(iter(trainer.get_train_dataloader()))
    torch.manual_seed(1234)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); compute_loss reads it
    return trainer._prepare_training_batch(inputs)


def loss_and_grads(trainer, batch):
    """compute_loss on `batch` and the gradient of every trainable parameter (by name)."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


# ---------------------------------------------------------------------------------------------------------------------
# Two-process check: run under `accelerate launch --multi_gpu --num_processes N` (gloo on CPU) or plainly (1 process).
def _main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True, help="torch.save target (rank 0 writes)")
    ap.add_argument("--mode", default="sampled_token")
    a = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # accelerate's state is only settled by the trainer's args
    per_device = 8 // world
    kw = dict(per_device_train_batch_size=per_device, lam=0.5, num_partners=2, teacher_model_kind="live",
              distillation_mode=a.mode, distillation_alpha=1.0 if a.mode == "sampled_token" else 0.5,
              distillation_topk=5 if a.mode == "topk_logits" else None, generation_kwargs={"do_sample": False})
    # TRL's default activation checkpointing stays on: the packed student runs under it, with DDP
    trainer = make_trainer(True, a.model, os.path.dirname(a.out), **kw)
    losses, batches, paths = [], [], []
    orig = trainer.compute_loss

    def record(model, inputs, *args, **kwargs):
        loss = orig(model, inputs, *args, **kwargs)
        paths.append(trainer.last_student_path)
        losses.append(trainer.accelerator.gather(loss.detach().reshape(1)).mean().item())
        acc = trainer.accelerator
        batches.append({k: acc.gather(acc.pad_across_processes(inputs[k], dim=1) if inputs[k].dim() > 1 else
                                      inputs[k]).cpu()
                        for k in ("prompt_ids", "completion_ids", "self_distillation_mask", "advantages")})
        return loss

    trainer.compute_loss = record
    trainer.train()
    if trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        params = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        torch.save({"losses": losses, "batches": batches, "params": params, "student_paths": paths,
                    "num_processes": trainer.accelerator.num_processes}, a.out)


if __name__ == "__main__":
    _main()
