"""Student update time with prompt sharing (one packed trie forward/backward) vs the padded per-sequence path.

    python bench/bench_update.py                        # CPU: the default step and the long-prompt workload
    python bench/bench_update.py --workloads default --repeats 7
    python bench/bench_update.py --workloads gpu --device cuda   # ANCHORS.md section 2's shape (Qwen2-1.5B, random)
    python bench/bench_update.py --workloads smoke      # seconds, for CI
    python bench/bench_update.py --checkpointing        # both paths under transformers' activation checkpointing

The update = forward + backward of the token-level student loss (the policy gradient on fixed advantages; the
sdpo/credit losses differ only in the advantages, which cost nothing here) over one step's P x G responses:
- padded: the trainer's padded path: micro-batches of `--micro-batch` responses, each left-padded prompt +
  response through the model, hidden states at the response rows, `linear_logprob`, backward per micro-batch.
- packed: `credit.packed_student.iter_packed_logprobs`: packs of whole groups under a token budget of
  micro_batch x the longest sequence (the padded micro-batch's activation bound), one trie forward each,
  backward per pack.
Both give the same gradients (tests/test_packed_student.py); the JSON records the max |logp| difference too.

Workloads: "default" = the embedded SmolLM2-135M, P=4 prompts of task 'largest' through the chat template
(~52 tokens), G=4 random 16-token responses (the trainer's default step); "long" = prompts of 512 tokens, G=8
rollouts of 64, P=2, on a random Llama of SmolLM2's shape (d=576, 9/3 heads, vocab 49152) with 8 layers instead of
30 (the embedded model's padded update runs minutes per repeat on 2 shared CPU cores); "long_embedded" = the same
batch on the embedded SmolLM2-135M itself (all 30 layers: the issue's long-prompt workload on the real model); "gpu" = Qwen2-1.5B-shaped random model (28 layers,
d=1536, GQA 12/2, vocab 151936), bf16, P=8, G=4, Lp=2048, Lr=1024. Timing: each repeat runs every provider once,
interleaved (a shared machine's load hits both alike); medians over repeats after one warm-up call each.

What sharing can save: the body runs unique tokens instead of all of them, but the LM head (linear_logprob at the
N response rows, forward + backward) does the same work on both paths. So besides the token-ratio bound
total / unique, the JSON gives the bound that keeps the head: padded / (head + (padded - head) x unique / total),
with the head's time ("head_only": linear_logprob fwd+bwd on N random rows) measured in the same run.
`--checkpointing` turns on the model's activation checkpointing (non-reentrant, transformers' default; TRL's too)
for both paths: each layer runs twice, and the packed path's replays attend over the trie as its forward does.
Writes bench/results/update_<card>.json (update_checkpointing_<card>.json with --checkpointing) and .png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import machine_info, plot_results, results_path, write_json  # noqa: E402
from credit.losses import policy_gradient_loss  # noqa: E402
from credit.models import hidden_states, lm_head_weight  # noqa: E402
from credit.packed_student import iter_packed_logprobs, plan_packs  # noqa: E402
from credit_kernels import build_prefix_trie, linear_logprob  # noqa: E402

PROVIDERS = ("padded", "packed", "head_only")
WORKLOADS = {
    # name: model, P, G, prompt length (None = the chat prompt of task 'largest'), response length, micro-batch
    "default": dict(model="embedded", prompts=4, rollouts=4, prompt_len=None, response_len=16, micro_batch=8),
    "long": dict(model="llama-576x8", prompts=2, rollouts=8, prompt_len=512, response_len=64, micro_batch=8),
    "long_embedded": dict(model="embedded", prompts=2, rollouts=8, prompt_len=512, response_len=64, micro_batch=8),
    "gpu": dict(model="qwen2-1.5b", prompts=8, rollouts=4, prompt_len=2048, response_len=1024, micro_batch=2),
    "smoke": dict(model="llama-tiny", prompts=2, rollouts=3, prompt_len=20, response_len=6, micro_batch=4),
}


# ---------------------------------------------------------------------------------------------------------------------
# Models and batches
# ---------------------------------------------------------------------------------------------------------------------
def _random_model(name: str, device, dtype):
    import transformers

    shapes = {
        "llama-576x8": (transformers.LlamaConfig, dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=8,
                                                       num_attention_heads=9, num_key_value_heads=3,
                                                       vocab_size=49152, tie_word_embeddings=True)),
        "qwen2-1.5b": (transformers.Qwen2Config, dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                                      num_attention_heads=12, num_key_value_heads=2,
                                                      vocab_size=151936, tie_word_embeddings=True)),
        "llama-tiny": (transformers.LlamaConfig, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300)),
    }
    config_cls, kw = shapes[name]
    torch.manual_seed(0)
    config = config_cls(max_position_embeddings=4096, **kw)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)


def _load(workload: dict, device, dtype):
    if workload["model"] != "embedded":
        return _random_model(workload["model"], device, dtype), None
    from credit.models import EMBEDDED, load_model

    return load_model(EMBEDDED, device=device, dtype=dtype)


def _batch(workload: dict, model, tokenizer, seed: int = 0):
    """P prompts, each repeated G times, and P x G random responses of the workload's length."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    n_p, n_g, lr = workload["prompts"], workload["rollouts"], workload["response_len"]
    if workload["prompt_len"] is None:  # the trainer's prompts: task 'largest' through the chat template
        from credit.envs import get_task

        env = get_task("largest")
        records = env.splits(seed=0, n_heldout=64).train[:n_p]
        prompts = []
        for r in records:
            text = tokenizer.apply_chat_template([{"role": "user", "content": env.make_prompt(r)}], tokenize=False,
                                                 add_generation_prompt=True)
            prompts.append(tokenizer.encode(text, add_special_tokens=False))
    else:
        prompts = [torch.randint(0, vocab, (workload["prompt_len"],), generator=g).tolist() for _ in range(n_p)]
    responses = [torch.randint(0, vocab, (lr,), generator=g).tolist() for _ in range(n_p * n_g)]
    return [prompts[i // n_g] for i in range(n_p * n_g)], responses


# ---------------------------------------------------------------------------------------------------------------------
# The two updates
# ---------------------------------------------------------------------------------------------------------------------
def _padded_logprobs(model, prompts, responses, width, device):
    """The trainer's padded path for one micro-batch: [b, width] student log-probs."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    longest = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), longest), dtype=torch.int64)
    attn = torch.zeros((len(seqs), longest), dtype=torch.int64)
    targets = torch.full((len(seqs), longest), -100, dtype=torch.int64)
    for b, (s, r) in enumerate(zip(seqs, responses)):
        ids[b, longest - len(s):] = torch.tensor(s)
        attn[b, longest - len(s):] = 1
        targets[b, longest - len(r) - 1: longest - 1] = torch.tensor(r)
    ids, attn, targets = ids.to(device), attn.to(device), targets.to(device)
    hidden = hidden_states(model, ids, attn)
    keep = targets != -100
    logp = linear_logprob(hidden[keep], lm_head_weight(model).to(hidden.dtype), targets[keep])
    out = torch.zeros((len(seqs), width), dtype=torch.float32, device=device)
    lengths = torch.tensor([len(r) for r in responses], device=device)
    return out.masked_scatter(torch.arange(width, device=device)[None] < lengths[:, None], logp)


def _micro_batches(provider, model, prompts, responses, micro_batch, device):
    """(indices, [b, T] log-probs) per micro-batch (padded) or per pack (packed), lazily: backward before the next."""
    width = max(len(r) for r in responses)
    if provider == "packed":
        budget = micro_batch * max(len(p) + len(r) for p, r in zip(prompts, responses))
        yield from iter_packed_logprobs(model, prompts, responses, max_tokens=budget, width=width)
        return
    for a in range(0, len(responses), micro_batch):
        idx = list(range(a, min(len(responses), a + micro_batch)))
        yield idx, _padded_logprobs(model, [prompts[i] for i in idx], [responses[i] for i in idx], width, device)


def make_head_only(model, responses, device):
    """linear_logprob forward + backward on N random hidden rows: the update's unshared part (the LM head)."""
    g = torch.Generator().manual_seed(2)
    weight = lm_head_weight(model)
    n = sum(len(r) for r in responses)
    hidden = (torch.randn((n, weight.shape[1]), generator=g) * 0.1).to(device, weight.dtype).requires_grad_(True)
    targets = torch.tensor([t for r in responses for t in r], device=device)
    adv = torch.randn(n, generator=g).to(device)

    def head():
        model.zero_grad(set_to_none=True)
        (-(adv * linear_logprob(hidden, weight, targets)).mean()).backward()
        hidden.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return head


def make_update(provider, model, prompts, responses, micro_batch, device, logs: list):
    """One update: zero grads, forward + backward of the token-mean policy-gradient loss per micro-batch / pack."""
    if provider == "head_only":
        return make_head_only(model, responses, device)
    g = torch.Generator().manual_seed(1)
    width = max(len(r) for r in responses)
    adv = torch.randn((len(responses), width), generator=g).to(device)
    mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in responses])[:, None]).float().to(device)
    total = float(mask.sum())

    def update():
        model.zero_grad(set_to_none=True)
        seen = torch.zeros((len(responses), width), device=device)
        for idx, s in _micro_batches(provider, model, prompts, responses, micro_batch, device):
            loss = policy_gradient_loss(s, adv[idx], mask[idx]) * (float(mask[idx].sum()) / total)
            loss.backward()
            seen[idx] = s.detach().float()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        logs.append(seen)

    return update


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------
def run_workload(name: str, device, dtype, repeats: int, micro_batch: int | None,
                 checkpointing: bool = False) -> list[dict]:
    w = dict(WORKLOADS[name])
    if micro_batch is not None:
        w["micro_batch"] = micro_batch
    model, tokenizer = _load(w, device, dtype)
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    prompts, responses = _batch(w, model, tokenizer)
    seqs = [p + r[:-1] for p, r in zip(prompts, responses)]
    unique, total = build_prefix_trie(seqs).num_unique, sum(len(s) for s in seqs)
    budget = w["micro_batch"] * max(len(p) + len(r) for p, r in zip(prompts, responses))
    n_packs = len(plan_packs(prompts, responses, max_tokens=budget))
    logs = {p: [] for p in PROVIDERS}
    fns = {p: make_update(p, model, prompts, responses, w["micro_batch"], device, logs[p]) for p in PROVIDERS}
    times = {p: [] for p in PROVIDERS}
    for p in PROVIDERS:  # warm-up (allocator, kernels)
        fns[p]()
    for _ in range(repeats):
        for p in PROVIDERS:
            t0 = time.perf_counter()
            fns[p]()
            times[p].append((time.perf_counter() - t0) * 1e3)
    err = float((logs["packed"][-1] - logs["padded"][-1]).abs().max())  # the last update's log-probs
    prompt_lens = sorted({len(p) for p in prompts})
    shape = f"{name}: P={w['prompts']} G={w['rollouts']} Lp={prompt_lens[0]}-{prompt_lens[-1]} Lr={w['response_len']}"
    shape += " (checkpointed)" if checkpointing else ""
    rows = []
    for p in PROVIDERS:
        q = statistics.quantiles(times[p], n=10) if len(times[p]) >= 2 else times[p] * 9
        rows.append(dict(workload=name, shape=shape, mode="fwd+bwd", provider=p, model=w["model"],
                         dtype=str(dtype).replace("torch.", ""), prompts=w["prompts"], rollouts=w["rollouts"],
                         prompt_lens=prompt_lens, response_len=w["response_len"], micro_batch=w["micro_batch"],
                         activation_checkpointing=checkpointing,
                         ms=statistics.median(times[p]), ms_p20=q[1], ms_p80=q[7], ms_all=times[p],
                         tokens_run={"packed": unique, "padded": total}.get(p), unique_tokens=unique, total_tokens=total,
                         unique_ratio=unique / total, packs=n_packs if p == "packed" else None,
                         response_tokens_per_s=len(responses) * w["response_len"] / (statistics.median(times[p]) / 1e3),
                         max_abs_diff_logp_vs_padded=err if p == "packed" else 0.0))
    pad, packed, head = (r["ms"] for r in rows)
    speedup = pad / packed
    ideal = total / unique
    with_head = pad / (head + (pad - head) * unique / total)  # the head's work is not shared
    for r in rows:
        r.update(speedup_packed=speedup, ideal_speedup=ideal, ideal_over_speedup=ideal / speedup,
                 ideal_speedup_with_head=with_head, ideal_with_head_over_speedup=with_head / speedup)
    print(f"{shape} ({w['model']}, {rows[0]['dtype']}): padded {pad:.0f} ms, packed {packed:.0f} ms -> {speedup:.2f}x; "
          f"unique-token ratio {unique}/{total} = {unique / total:.3f} (ideal {ideal:.2f}x, {ideal / speedup:.2f}x off "
          f"it); head alone {head:.0f} ms (ideal keeping it {with_head:.2f}x, {with_head / speedup:.2f}x off it); "
          f"max |dlogp| {err:.2e}")
    del model
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=None, help=f"comma list of {list(WORKLOADS)} (default: CPU default,long; "
                                                     "CUDA gpu)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="fp32 (CPU default) or bf16 (CUDA default)")
    p.add_argument("--repeats", type=int, default=5, help="timed updates per provider, interleaved")
    p.add_argument("--micro-batch", type=int, default=None, help="responses per padded micro-batch (default: the "
                                                                 "workload's; the packs' budget follows it)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/update_<card>.json)")
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing on (non-reentrant) for both paths")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    names = (args.workloads or ("gpu" if device.type == "cuda" else "default,long")).split(",")
    for n in names:
        if n not in WORKLOADS:
            p.error(f"--workloads: unknown workload {n!r}; choose from {list(WORKLOADS)}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = []
    for n in names:
        rows += run_workload(n, device, dtype, args.repeats, args.micro_batch, args.checkpointing)
    meta = machine_info(device)
    meta.update(bench="update", torch_threads=torch.get_num_threads(), repeats=args.repeats,
                note="CPU runs share the machine with other jobs: medians of interleaved repeats")
    out = args.out or results_path(meta, "update_checkpointing" if args.checkpointing else "update")
    write_json(out, meta, rows)
    if not args.no_plot:
        plot_results(out, out[: -len(".json")] + ".png", title="student update (fwd+bwd)", metric="ms")
    return rows


if __name__ == "__main__":
    main()
