"""Stock TRL SDPOTrainer step vs CreditSDPOTrainer at M = 0, 1, 3 on the same rollouts (trl==1.16.0).

    python bench/bench_trl.py --smoke            # CPU, tiny random Llama, seconds; JSON to bench/results/
    python bench/bench_trl.py                    # GPU: a Qwen2-1.5B-shaped model with random weights, bf16

One batch of rollouts is built once through TRL's own pipeline (prompts, rewards, teacher contexts; the
completions are random tokens of a fixed length instead of sampled ones, so every peer sees identical work) and
then each peer runs compute_loss + backward on it (no optimizer step, so the weights stay fixed):

- "sdpo": stock `SDPOTrainer` (full [B, T, V] student and teacher logits);
- "credit_M0": `CreditSDPOTrainer`, lam = 0 (SDPO's objective through the packed teacher and fused heads);
- "credit_M1", "credit_M3": lam = 0.5 with 1 / 3 shuffled teacher contexts per response.

Rows: step time (median / p20 / p80 ms), teacher time (the teacher passes alone), peak memory beyond the live
tensors (CUDA only). Distillation mode `--mode sampled_token` (default) or `topk_logits`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import bench_ms, machine_info, results_path, write_json  # noqa: E402

CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# (hidden, layers, heads, kv heads, intermediate, vocab)
MODELS = {
    "smoke": (64, 2, 4, 2, 128, 4096),
    "qwen2-1.5b": (1536, 28, 12, 2, 8960, 151936),
}


def byte_tokenizer():
    """A byte-level tokenizer built locally (no hub): exact round trip of any text, ids 0..257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                 additional_special_tokens=["<|im_start|>"])
    hf.chat_template = CHAT
    return hf


def build_model(name: str, tok, dtype: torch.dtype, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, inter, vocab = MODELS[name]
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=8192,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)


def reward(completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(sum(map(ord, t)) % 2) for t in texts]  # a deterministic mix of successes and failures


def make_trainer(credit: bool, model, tok, args, out_dir: str, num_partners: int, lam: float):
    from datasets import Dataset
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    from credit.integrations.trl import CreditSDPOConfig, CreditSDPOTrainer

    prompts = [[{"role": "user", "content": f"Problem {i}: " + "explain the following carefully. " * args.prompt_words}]
               for i in range(args.prompts)]
    common = dict(output_dir=out_dir, use_cpu=args.device == "cpu", report_to=[], save_strategy="no",
                  per_device_train_batch_size=args.prompts * args.generations, num_generations=args.generations,
                  max_completion_length=args.completion_len, teacher_model_kind="live", disable_tqdm=True,
                  distillation_mode=args.mode, distillation_alpha=1.0 if args.mode == "sampled_token" else 0.5,
                  distillation_topk=args.topk if args.mode == "topk_logits" else None, success_reward_threshold=0.5,
                  dont_reprompt_on_self_success=False, bf16=False, seed=0)
    if credit:
        cfg = CreditSDPOConfig(lam=lam, num_partners=num_partners, **common)
        cls = CreditSDPOTrainer
    else:
        cfg, cls = SDPOConfig(**common), SDPOTrainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=model, reward_funcs=reward, args=cfg, processing_class=tok,
                      train_dataset=Dataset.from_dict({"prompt": prompts}))
    gen = torch.Generator().manual_seed(0)

    def fixed_generate(prompt_ids):  # random completions of a fixed length (byte tokens, then EOS)
        comps = [torch.randint(0, 256, (args.completion_len - 1,), generator=gen).tolist() + [tok.eos_token_id]
                 for _ in prompt_ids]
        return prompt_ids, comps

    trainer._generate = fixed_generate
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def stock_teacher_ms(trainer, batch) -> float:
    def run():
        with torch.no_grad():
            return trainer._forward_logits(trainer.teacher_model, batch["teacher_input_ids"],
                                           batch["teacher_attention_mask"], batch["completion_ids"].size(1))
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU smoke size (tiny model, small batch)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available, cpu for --smoke)")
    ap.add_argument("--mode", default="sampled_token", choices=["sampled_token", "topk_logits"])
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=None, help="P prompts per step")
    ap.add_argument("--generations", type=int, default=None, help="G rollouts per prompt (smoke 2, else 4)")
    ap.add_argument("--completion-len", type=int, default=None, help="tokens per completion")
    ap.add_argument("--prompt-words", type=int, default=None, help="prompt length knob (repeats of a phrase)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/trl_<card>.json)")
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    device = torch.device(args.device)
    name = "smoke" if args.smoke else "qwen2-1.5b"
    args.prompts = args.prompts or (4 if args.smoke else 8)
    args.completion_len = args.completion_len or (16 if args.smoke else 512)
    args.generations = args.generations or (2 if args.smoke else 4)
    args.prompt_words = args.prompt_words or (2 if args.smoke else 40)
    if args.smoke:
        args.topk = min(args.topk, 20)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tok = byte_tokenizer()
    model = build_model(name, tok, dtype, device)
    tmp = tempfile.mkdtemp(prefix="bench_trl_")

    peers = [("sdpo", False, 0, 0.0), ("credit_M0", True, 0, 0.0), ("credit_M1", True, 1, 0.5),
             ("credit_M3", True, 3, 0.5)]
    trainers = {p: make_trainer(c, model, tok, args, os.path.join(tmp, p), m, lam) for p, c, m, lam in peers}
    # one batch of rollouts for everyone: built by the M=3 trainer (it holds the partner contexts of all peers)
    torch.manual_seed(0)
    source = trainers["credit_M3"]
    source.model.train()
    batch = source._prepare_training_batch(next(iter(source.get_train_dataloader())))
    rows = []
    for provider, credit, num_partners, _lam in peers:
        trainer = trainers[provider]
        b = dict(batch)
        b["credit_partner_ids"] = batch["credit_partner_ids"][:, :num_partners]
        b["credit_partner_mask"] = batch["credit_partner_mask"][:, :num_partners]

        def step(trainer=trainer, b=b):
            trainer.model.zero_grad(set_to_none=True)
            loss = trainer.compute_loss(trainer.model, b)
            loss.backward()
            return loss.detach()

        ms = bench_ms(step, device)
        peak = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        if credit:
            step()
            teacher_ms = trainer.last_teacher_time_s * 1e3
        else:
            teacher_ms = bench_ms(stock_teacher_ms(trainer, b), device)[0]
        rows.append({"provider": provider, "num_partners": num_partners, "lam": _lam, "mode": args.mode,
                     "step_ms": ms, "teacher_ms": teacher_ms, "peak_extra_mib": peak})
        print(f"{provider:10s} step {ms[0]:9.1f} ms  teacher {teacher_ms:9.1f} ms  peak {peak} MiB", flush=True)
    b_sz, t_len = batch["completion_ids"].shape
    meta = machine_info(device)
    meta.update({"model": name, "shape": dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"),
                                                  MODELS[name])),
                 "batch": b_sz, "completion_len": t_len, "teacher_context_len": int(batch["teacher_input_ids"].size(1)
                                                                                    - t_len),
                 "dtype": str(dtype), "trl": __import__("trl").__version__, "smoke": args.smoke,
                 "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    write_json(args.out or results_path(meta, "trl"), meta, rows)
    return rows


if __name__ == "__main__":
    main()
