"""Teacher scoring end to end: ours (prefix trie + tree attention + fused head) vs the peers, in one process.

    python bench/bench_scoring.py                                   # GPU: the workloads below, bf16
    python bench/bench_scoring.py --workloads anchors --ms 3        # one workload, one M
    python bench/bench_scoring.py --smoke --out /tmp/scoring.json   # CI: tiny random model on CPU, < 60 s

Model: a Qwen2-shaped 1.5B with random weights (28 layers, d=1536, GQA 12/2, intermediate 8960, V=151936, tied
embeddings), bf16 on the GPU; `--smoke` uses a tiny fp32 Qwen2 (d=64, 2 layers, V=1000) on the CPU.

Workloads (docs/design.md, "Benchmarks" and "Teacher scoring"):
    anchors  P=8 prompts of Lp=2048 tokens, G=4 responses of Lr=1024 each; every response scored under its own
             prompt and M shuffled ones (the next M prompts, cyclically): M = 0, 1, 3.
    sdpo     P=8 prompts (Lp=1024) x G=8 rollouts with long-tailed lengths (lognormal, median 600, 64..4096).
             Rollout 0 of each group succeeds; the 7 failing ones get it as the sibling solution f in the teacher
             context c(x, f) = x + solution header + f + reprompt, and are scored under c(x_g, f_g) and M shuffled
             c(x_j, f_g) (input swap): M = 1, 3. The successful rollout has no feedback (mask 0).

Providers (all return per-pair fp32 log-probs; errors are reported against "naive"):
    naive         TeacherScorer(backend="naive"): each distinct context + response in left-padded batches of
                  <= max_tokens tokens, the model's logits at the response positions, fp32 log_softmax.
    prefix_cache  each distinct context run once with transformers' DynamicCache; its KV copied and expanded
                  over a right-padded batch of that context's responses; full logits; fp32 log_softmax. Caching
                  the whole context (not only the prompt) makes this peer as strong as prefix caching gets here.
    tree          TeacherScorer(backend="tree"): one trie, packed forward of the unique tokens, Triton tree
                  attention on the GPU (the torch reference on the CPU), linear_logprob at the response rows.
    tree_flex     the same with FlexAttention (GPU, when torch has it).

Reported per (workload, M, provider): response tokens scored per second (median of the timed runs), p20/p80 ms,
peak extra memory (CUDA), tokens run through the model and the unique-token ratio (tokens run / tokens of all
pairs' sequences), speedups over naive and prefix_cache, and for tree "x_ratio_bound": the speedup over naive
divided by what the unique-token ratio allows (1.0 = the whole sharing turned into speed). JSON + PNG.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import math
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import machine_info, peak_extra_mib, plot_results, results_path, write_json  # noqa: E402
from credit.scoring import TeacherScorer  # noqa: E402

PROVIDERS = ["naive", "prefix_cache", "tree", "tree_flex"]
QWEN2_1P5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1000, max_position_embeddings=4096, tie_word_embeddings=True)


# ---------------------------------------------------------------------------------------------------------------------
# workloads: (contexts, responses, pairs) as token-id lists
# ---------------------------------------------------------------------------------------------------------------------
def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def anchors_workload(m: int, *, vocab: int, p: int = 8, g: int = 4, lp: int = 2048, lr: int = 1024, seed: int = 0):
    """P prompts, G responses each, scored under their prompt and the next M prompts."""
    rng = random.Random(seed)
    header = _tokens(rng, min(16, lp // 4), vocab)  # a shared chat-template prefix
    contexts = [header + _tokens(rng, lp - len(header), vocab) for _ in range(p)]
    responses = [_tokens(rng, lr, vocab) for _ in range(p * g)]
    pairs = [(i, (i // g + s) % p) for i in range(p * g) for s in range(m + 1)]
    return contexts, responses, pairs


def sdpo_workload(m: int, *, vocab: int, p: int = 8, g: int = 8, lp: int = 1024, median: int = 600,
                  lo: int = 64, hi: int = 4096, seed: int = 0):
    """SDPO-shaped: 7 failing rollouts of a group share one sibling solution in f; long-tailed lengths."""
    rng = random.Random(seed)
    header = _tokens(rng, min(16, lp // 4), vocab)
    prompts = [header + _tokens(rng, lp - len(header), vocab) for _ in range(p)]
    sol_head, reprompt = _tokens(rng, 8, vocab), _tokens(rng, 12, vocab)
    lengths = [max(lo, min(hi, int(rng.lognormvariate(math.log(median), 0.8)))) for _ in range(p * g)]
    responses = [_tokens(rng, n, vocab) for n in lengths]
    contexts, index, pairs = [], {}, []

    def context(x: int, f: int) -> int:  # c(x_x, f_f), deduplicated
        if (x, f) not in index:
            index[(x, f)] = len(contexts)
            contexts.append(prompts[x] + sol_head + responses[f * g] + reprompt)
        return index[(x, f)]

    for grp in range(p):
        for i in range(grp * g + 1, grp * g + g):  # failing rollouts; rollout grp*g is the sibling solution
            pairs += [(i, context((grp + s) % p, grp)) for s in range(m + 1)]
    return contexts, responses, pairs


# ---------------------------------------------------------------------------------------------------------------------
# the prefix-cache peer
# ---------------------------------------------------------------------------------------------------------------------
def _cache_kw(model) -> str:  # transformers 5.24 renamed past_key_values to cache
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def prefix_cache_score(model, contexts, responses, pairs, *, max_tokens: int):
    """Each distinct context once (DynamicCache), KV expanded over right-padded batches of its responses."""
    device = next(model.parameters()).device
    kw = _cache_kw(model)
    out = [torch.zeros(0, device=device) for _ in pairs]
    by_ctx: dict[int, list[int]] = {}
    for q, (i, j) in enumerate(pairs):
        if responses[i]:
            by_ctx.setdefault(j, []).append(q)
    tokens_run = 0
    for j, qs in by_ctx.items():
        ctx = torch.tensor([contexts[j]], device=device)
        res = model(input_ids=ctx, use_cache=True, logits_to_keep=1)
        first = res.logits[0, -1].float().log_softmax(-1)  # predicts every response's first token
        cache = getattr(res, "cache", None)
        cache = res.past_key_values if cache is None else cache
        tokens_run += ctx.shape[1]
        qs = sorted(qs, key=lambda q: -len(responses[pairs[q][0]]))
        a = 0
        while a < len(qs):
            width = len(responses[pairs[qs[a]][0]])
            b = a + max(1, max_tokens // width)
            batch = qs[a:b]
            a = b
            ids = torch.zeros((len(batch), width), dtype=torch.int64)
            mask = torch.zeros((len(batch), ctx.shape[1] + width), dtype=torch.int64)
            mask[:, : ctx.shape[1]] = 1
            for r, q in enumerate(batch):
                resp = responses[pairs[q][0]]
                ids[r, : len(resp)] = torch.tensor(resp)
                mask[r, ctx.shape[1] : ctx.shape[1] + len(resp)] = 1
                tokens_run += len(resp)
            expanded = copy.deepcopy(cache)
            expanded.batch_repeat_interleave(len(batch))
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
                           **{kw: expanded}).logits
            for r, q in enumerate(batch):
                resp = torch.tensor(responses[pairs[q][0]], device=device)
                lp = logits[r, : resp.numel() - 1].float().log_softmax(-1)
                rest = lp.gather(1, resp[1:, None])[:, 0]
                out[q] = torch.cat([first[resp[:1]], rest])
            del logits, expanded
    return out, tokens_run


# ---------------------------------------------------------------------------------------------------------------------
# running one provider
# ---------------------------------------------------------------------------------------------------------------------
def unavailable(provider: str, device: torch.device) -> str | None:
    if provider == "tree_flex":
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return "torch has no flex_attention"
        if device.type != "cuda":
            return "flex runs unfused (O(U^2)) on the CPU: GPU only"
    return None


def setup(provider: str, model, work, *, max_tokens: int, device: torch.device):
    """A zero-argument callable scoring the workload: returns (per-pair logp list, tokens run through the model)."""
    contexts, responses, pairs = work
    if provider == "prefix_cache":
        return lambda: prefix_cache_score(model, contexts, responses, pairs, max_tokens=max_tokens)
    if provider == "naive":
        scorer = TeacherScorer(model, backend="naive", max_tokens=max_tokens)
    else:
        attn = "flex" if provider == "tree_flex" else ("triton" if device.type == "cuda" else "torch")
        scorer = TeacherScorer(model, backend="tree", attn_backend=attn, max_tokens=max_tokens)

    def run():
        return scorer.score(contexts, responses, pairs), scorer.last_unique_tokens

    return run


def _timed(fn, device, reps: int):
    """Wall-clock ms of `reps` runs after one warm-up (compilation, allocator); each run is seconds long."""
    out = fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return out, [statistics.median(times), q[1], q[7]]


def run_case(name: str, m: int, work, model, providers, *, max_tokens: int, reps: int, device: torch.device):
    contexts, responses, pairs = work
    resp_tokens = sum(len(responses[i]) for i, _ in pairs)
    total = sum(len(contexts[j]) + len(responses[i]) for i, j in pairs if responses[i])
    base = {"workload": name, "M": m, "shape": f"{name} M={m}", "mode": "fwd", "pairs": len(pairs),
            "resp_tokens": resp_tokens, "total_tokens": total,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    rows, ref = [], None
    for provider in providers:
        row = {**base, "provider": provider}
        reason = unavailable(provider, device)
        if reason:
            rows.append({**row, "skipped": reason})
            print(f"  {provider:13s} skipped: {reason}")
            continue
        try:
            fn = setup(provider, model, work, max_tokens=max_tokens, device=device)
            (logp, tokens_run), ms = _timed(fn, device, reps)
            mem = peak_extra_mib(fn, device)
        except Exception as e:  # a provider failing (e.g. out of memory) is a result, not a crash
            rows.append({**row, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"  {provider:13s} ERROR {type(e).__name__}: {str(e)[:160]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        flat = torch.cat([x.float().cpu() for x in logp]) if logp else torch.zeros(0)
        if ref is None:
            ref = flat
        row.update(ms=ms[0], ms_p20=ms[1], ms_p80=ms[2], resp_tok_per_s=resp_tokens / (ms[0] * 1e-3),
                   tokens_run=tokens_run, unique_ratio=tokens_run / total, peak_extra_mib=mem,
                   max_abs_err=float((flat - ref).abs().max()) if flat.numel() else 0.0)
        rows.append(row)
        print(f"  {provider:13s} {ms[0]:10.1f} ms  {row['resp_tok_per_s']:10.0f} resp tok/s  unique {tokens_run:8d}"
              f" ({row['unique_ratio']:.3f})" + (f"  {mem:9.0f} MiB" if mem is not None else "")
              + f"  err {row['max_abs_err']:.2e}")
    speed = {r["provider"]: r["resp_tok_per_s"] for r in rows if "resp_tok_per_s" in r}
    for r in rows:
        if "resp_tok_per_s" not in r:
            continue
        for peer in ("naive", "prefix_cache"):
            if peer in speed:
                r[f"x_{peer}"] = r["resp_tok_per_s"] / speed[peer]
        if r["provider"].startswith("tree") and "x_naive" in r:
            naive_ratio = next(x["unique_ratio"] for x in rows if x["provider"] == "naive")
            r["x_ratio_bound"] = r["x_naive"] / (naive_ratio / r["unique_ratio"])
    return rows


def build_model(config_kw: dict, dtype: torch.dtype, device: torch.device):
    import transformers

    config = transformers.Qwen2Config(**config_kw, attn_implementation="sdpa")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype, on the device
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny model and workloads on the CPU, for CI (< 60 s)")
    p.add_argument("--workloads", default="anchors,sdpo")
    p.add_argument("--ms", default=None, help="comma list of M (default: anchors 0,1,3; sdpo 1,3)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list from {PROVIDERS}")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per forward (default 32768; smoke 256)")
    p.add_argument("--reps", type=int, default=None, help="timed runs after one warm-up (default 3; smoke 1)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/scoring_<card>.json)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)

    device = torch.device("cpu" if args.smoke else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config_kw = TINY if args.smoke else QWEN2_1P5B
    max_tokens = args.max_tokens or (256 if args.smoke else 32768)
    reps = args.reps or (1 if args.smoke else 3)
    vocab = config_kw["vocab_size"]
    if args.smoke:  # same structure, lengths / 64 and fewer prompts
        makers = {"anchors": lambda m: anchors_workload(m, vocab=vocab, p=4, g=2, lp=32, lr=16),
                  "sdpo": lambda m: sdpo_workload(m, vocab=vocab, p=4, g=4, lp=16, median=10, lo=2, hi=64)}
    else:
        makers = {"anchors": lambda m: anchors_workload(m, vocab=vocab),
                  "sdpo": lambda m: sdpo_workload(m, vocab=vocab)}
    default_ms = {"anchors": [0, 1, 3], "sdpo": [1, 3]}
    providers = args.providers.split(",")

    meta = machine_info(device)
    meta.update(bench="scoring", smoke=args.smoke, model=config_kw, max_tokens=max_tokens, reps=reps)
    out = args.out or results_path(meta, "scoring")

    t0 = time.perf_counter()
    model = build_model(config_kw, dtype, device)
    print(f"model: Qwen2 {config_kw['num_hidden_layers']} layers d={config_kw['hidden_size']} V={vocab} {dtype} "
          f"on {meta['card']} (built in {time.perf_counter() - t0:.1f} s)")
    results = []
    for name in args.workloads.split(","):
        for m in [int(x) for x in args.ms.split(",")] if args.ms else default_ms[name]:
            work = makers[name](m)
            print(f"{name} M={m}: {len(work[2])} pairs, {len(work[0])} contexts")
            results += run_case(name, m, work, model, providers, max_tokens=max_tokens, reps=reps, device=device)
            write_json(out, meta, results)  # after every case: a run cut short by a time limit keeps what finished
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not args.no_plot:
        plot_results(out, out.replace(".json", ".png"), title="teacher scoring", metric="resp_tok_per_s")
    return results


if __name__ == "__main__":
    main()
