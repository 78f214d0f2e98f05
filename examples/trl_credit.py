"""CREDIT inside TRL: train the embedded SmolLM2-135M-Instruct with CreditSDPOTrainer, held-out accuracy before/after.

One machine, CPU or one GPU:

    python examples/trl_credit.py --steps 10

Several GPUs (DDP through accelerate; partners are drawn over the global batch, each rank scores its own shard):

    accelerate launch --multi_gpu --num_processes 8 examples/trl_credit.py --steps 200 --per-device 8

Several machines: the same script under `accelerate launch --num_machines N --machine_rank R --main_process_ip ...`
(or DeepSpeed ZeRO-1/2 with `--use_deepspeed`). FSDP and ZeRO-3 are refused (the packed teacher scorer needs full
weights on every rank).

Task: `largest` from credit.envs (the largest of three numbers; the first number in the reply is the answer),
outcome reward 1/0, environment feedback "Wrong answer for input [...]. The correct answer is N." for responses
without a successful sibling. Held-out accuracy: greedy decoding on held-out inputs never trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded", help="a local model directory, or 'embedded' (SmolLM2-135M)")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps")
    ap.add_argument("--per-device", type=int, default=8, help="responses per device per step")
    ap.add_argument("--num-generations", type=int, default=4, help="rollouts per prompt (G)")
    ap.add_argument("--lam", type=float, default=0.5, help="CREDIT debiasing weight (0 = SDPO)")
    ap.add_argument("--num-partners", type=int, default=1, help="shuffled teacher contexts per response (M)")
    ap.add_argument("--mode", default="sampled_token", choices=["sampled_token", "topk_logits"])
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--heldout", type=int, default=48, help="held-out prompts for the accuracy")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", default="runs/trl_credit", help="output dir (a metrics.json is written there)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def chat(task, record):
    return [{"role": "user", "content": task.make_prompt(record)}]


@torch.no_grad()
def heldout_accuracy(model, tok, task, records, max_new_tokens: int) -> float:
    """Greedy held-out accuracy (batches of 16, left padding)."""
    was_training = model.training
    model.eval()
    tok.padding_side = "left"
    right = 0
    for start in range(0, len(records), 16):
        batch = records[start : start + 16]
        texts = [tok.apply_chat_template(chat(task, r), tokenize=False, add_generation_prompt=True) for r in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        replies = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        right += sum(task.score(r, y).success for r, y in zip(batch, replies))
    model.train(was_training)
    return right / len(records)


def main(argv=None):
    args = parse_args(argv)
    from datasets import Dataset
    from transformers import AutoTokenizer

    from credit.envs.synthetic import LargestTask
    from credit.integrations.trl import CreditSDPOConfig, CreditSDPOTrainer
    from credit.models import _embedded_dir

    model_dir = _embedded_dir() if args.model == "embedded" else args.model
    task = LargestTask()
    split = task.splits(seed=args.seed, n_heldout=args.heldout)
    train = split.train
    data = Dataset.from_dict({
        "prompt": [chat(task, r) for r in train],
        "answer": [r["answer"] for r in train],
        "input": [r["input"] for r in train],
        "privileged_context": [task.score(r, "").feedback for r in train],  # names the input and the answer
    })

    def outcome(prompts, completions, answer, input, **kwargs):  # noqa: A002 (TRL passes dataset columns by name)
        recs = [{"answer": a, "input": x} for a, x in zip(answer, input)]
        return [task.score(r, c[0]["content"]).reward for r, c in zip(recs, completions)]

    config = CreditSDPOConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.per_device,
        num_generations=args.num_generations, max_completion_length=args.max_new_tokens, learning_rate=args.lr,
        lam=args.lam, num_partners=args.num_partners, distillation_mode=args.mode,
        distillation_alpha=1.0 if args.mode == "sampled_token" else 0.5,
        distillation_topk=20 if args.mode == "topk_logits" else None,
        include_environment_feedback=True, environment_feedback_only_without_solution=True,
        success_reward_threshold=1.0, teacher_model_kind="ema", seed=args.seed, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        generation_kwargs={"do_sample": True, "temperature": 1.0},
    )
    from transformers import TrainerCallback

    logged: list[dict] = []

    class KeepLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs or {}))

    trainer = CreditSDPOTrainer(model=model_dir, reward_funcs=outcome, args=config, train_dataset=data,
                                callbacks=[KeepLogs()])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    main_proc = trainer.accelerator.is_main_process

    t0 = time.perf_counter()
    before = heldout_accuracy(model, tok, task, split.heldout, args.max_new_tokens) if main_proc else None
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    after = heldout_accuracy(model, tok, task, split.heldout, args.max_new_tokens) if main_proc else None
    if main_proc:
        rewards = [round(float(h["self_distillation/reward_mean"]), 4) for h in logged
                   if "self_distillation/reward_mean" in h]
        result = {
            "task": task.name, "model": args.model, "steps": args.steps, "lam": args.lam,
            "num_partners": args.num_partners, "mode": args.mode, "heldout": len(split.heldout),
            "heldout_accuracy_before": before, "heldout_accuracy_after": after, "train_reward_per_step": rewards,
            "train_s": round(t2 - t1, 1), "eval_s": round(t1 - t0, 1),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "num_processes": trainer.accelerator.num_processes,
        }
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
