"""credit.evaluation: intervals against fp64 references and published values, greedy/sampled accuracy and the
shortcut rate through a scripted sampler, the step-0 cache, and the trainer writing it all."""

import json
import math
import os

import pytest
import torch

from credit.config import TrainConfig
from credit.envs import get_task
from credit.evaluation import (
    EvalResult,
    base_eval_key,
    cached_evaluation,
    evaluate,
    evaluate_heldout,
    mean_interval,
    proportion_interval,
    t_quantile,
)
from credit.evaluation import _t_abs_cdf as t_abs_cdf
from tests.utils import HAS_TEST_TOKENIZER

# ---------------------------------------------------------------------------------------------
# intervals
# ---------------------------------------------------------------------------------------------

# two-sided 95% (and one 90%) Student-t critical values, from standard tables
T_TABLE = [(0.95, 1, 12.706204736), (0.95, 2, 4.302652730), (0.95, 4, 2.776445105), (0.95, 9, 2.262157163),
           (0.95, 29, 2.045229642), (0.90, 4, 2.131846786), (0.99, 3, 5.840909310)]


@pytest.mark.parametrize("level, df, want", T_TABLE)
def test_t_quantile_matches_tables(level, df, want):
    assert t_quantile(level, df) == pytest.approx(want, rel=1e-8)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10])
@pytest.mark.parametrize("t", [0.3, 1.0, 2.5])
def test_t_cdf_matches_fp64_quadrature_of_the_density(df, t):
    x = torch.linspace(0.0, t, 200_001, dtype=torch.float64)
    dens = torch.exp(torch.lgamma(torch.tensor((df + 1) / 2, dtype=torch.float64))
                     - torch.lgamma(torch.tensor(df / 2, dtype=torch.float64))) / math.sqrt(df * math.pi)
    dens = dens * (1 + x * x / df) ** (-(df + 1) / 2)
    want = 2 * float(torch.trapezoid(dens, x))
    assert t_abs_cdf(t, df) == pytest.approx(want, abs=1e-9)


def test_wilson_interval_published_values_and_edges():
    lo, hi = proportion_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.236593, abs=1e-6), pytest.approx(0.763407, abs=1e-6))
    lo, hi = proportion_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.277533, abs=1e-6)
    lo, hi = proportion_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.277533, abs=1e-6)
    lo, hi = proportion_interval(39, 400)  # the largest_shortcut base rate
    assert (lo, hi) == (pytest.approx(0.0721, abs=5e-4), pytest.approx(0.1305, abs=5e-4))


def test_mean_interval_is_the_t_interval():
    vals = [0.12, 0.20, 0.08, 0.15, 0.10]
    mean, lo, hi = mean_interval(vals)
    sd = float(torch.tensor(vals, dtype=torch.float64).std())
    half = 2.776445105 * sd / math.sqrt(5)
    assert mean == pytest.approx(0.13) and lo == pytest.approx(0.13 - half) and hi == pytest.approx(0.13 + half)
    m1, lo1, hi1 = mean_interval([0.4])
    assert m1 == 0.4 and math.isnan(lo1) and math.isnan(hi1)


def test_interval_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="n must be"):
        proportion_interval(0, 0)
    with pytest.raises(ValueError, match="successes must be"):
        proportion_interval(11, 10)
    with pytest.raises(ValueError, match="level"):
        proportion_interval(1, 10, level=1.5)
    with pytest.raises(ValueError, match="df must be"):
        t_quantile(0.95, 0)
    with pytest.raises(ValueError, match="empty"):
        mean_interval([])
    with pytest.raises(ValueError, match="NaN"):
        mean_interval([0.1, float("nan")])


# ---------------------------------------------------------------------------------------------
# evaluation through a scripted sampler
# ---------------------------------------------------------------------------------------------


class TextTokenizer:
    """One token per distinct text: encode(text) -> [id], decode([id]) -> text."""

    chat_template = None

    def __init__(self):
        self.texts: list[str] = []

    def encode(self, text):
        if text not in self.texts:
            self.texts.append(text)
        return [self.texts.index(text)]

    def decode(self, ids, skip_special_tokens=True):
        return self.texts[ids[0]]


class ScriptedSampler:
    """Replies from a table prompt text -> (greedy reply, [sampled replies]); records every call."""

    name = "scripted"

    def __init__(self, tok, replies):
        self.tok, self.replies, self.calls = tok, replies, []

    def sync_weights(self, model):
        self.synced = model

    def sample(self, prompts, num_samples, *, greedy, seed=None):
        self.calls.append((len(prompts), num_samples, greedy, seed))
        out = []
        for p in prompts:
            greedy_reply, sampled = self.replies[self.tok.decode(p)]
            texts = [greedy_reply] if greedy else sampled[:num_samples]
            assert len(texts) == num_samples
            out.extend(self.tok.encode(t) for t in texts)
        return out


def _scripted(env, records, k):
    tok = TextTokenizer()
    replies = {}
    for i, r in enumerate(records):
        ans = r["answer"]
        greedy = ans if i % 2 == 0 else "To find the largest number, 0"  # even records right, odd take the shortcut
        sampled = [ans if (i + j) % 3 == 0 else "0" for j in range(k)]
        replies[env.make_prompt(r)] = (greedy, sampled)
    return tok, ScriptedSampler(tok, replies)


def _want(records, k):
    n = len(records)
    per = [sum((i + j) % 3 == 0 for j in range(k)) / k for i in range(n)] if k else []
    return sum(i % 2 == 0 for i in range(n)) / n, per


@pytest.mark.parametrize("n, k, batch", [(7, 3, 4), (5, 1, 32), (6, 0, 2)])
def test_evaluate_heldout_greedy_sampled_and_shortcut(n, k, batch):
    env = get_task("largest_shortcut")
    records = env.splits(seed=0).heldout[:n]
    tok, sampler = _scripted(env, records, k)
    cfg = TrainConfig(eval_sampled=k, eval_seed=77)
    res = evaluate_heldout(None, tok, env, records, cfg, batch=batch, sampler=sampler)
    greedy, per = _want(records, k)
    assert res.n == n and res.greedy == pytest.approx(greedy)
    assert res.greedy_interval == pytest.approx(proportion_interval(round(greedy * n), n))
    assert res.shortcut_greedy == pytest.approx((n // 2) / n)
    if k:
        assert res.samples == k and res.sampled == pytest.approx(sum(per) / n)
        lo, hi = mean_interval(per)[1:]
        assert res.sampled_interval == pytest.approx((max(0.0, lo), min(1.0, hi)))
        assert res.shortcut_sampled == 0.0
        seeds = [c[3] for c in sampler.calls if not c[2]]
        per_call = max(1, batch // k)
        assert seeds == [77 + s for s in range(0, n, per_call)]  # one fixed seed stream per evaluation
        m = res.metrics()
        assert m["eval/accuracy_sampled"] == res.sampled and "eval/shortcut_rate_sampled" in m
    else:
        assert res.sampled is None and all(c[2] for c in sampler.calls)
        assert "eval/accuracy_sampled" not in res.metrics()
    assert all(c[3] is None for c in sampler.calls if c[2])  # greedy is not seeded
    assert evaluate(None, tok, env, records, cfg, sampler=sampler) == res.greedy


def test_evaluate_heldout_tasks_without_shortcut_and_empty_records():
    env = get_task("largest")
    records = env.splits(seed=0).heldout[:3]
    tok, sampler = _scripted(env, records, 2)
    res = evaluate_heldout(None, tok, env, records, TrainConfig(eval_sampled=2), sampler=sampler)
    assert res.shortcut_greedy is None and res.shortcut_sampled is None and "eval/shortcut_rate" not in res.metrics()
    empty = evaluate_heldout(None, tok, env, [], TrainConfig(), sampler=sampler)
    assert empty.n == 0 and math.isnan(empty.greedy)
    assert math.isnan(evaluate(None, tok, env, [], TrainConfig(), sampler=sampler))
    with pytest.raises(ValueError, match="sampled must be"):
        evaluate_heldout(None, tok, env, records, TrainConfig(), sampler=sampler, sampled=-1)
    with pytest.raises(ValueError, match="batch must be"):
        evaluate_heldout(None, tok, env, records, TrainConfig(), sampler=sampler, batch=0)


# ---------------------------------------------------------------------------------------------
# the step-0 cache
# ---------------------------------------------------------------------------------------------


def test_cached_evaluation_computes_once_per_key(tmp_path):
    path = str(tmp_path / "sub" / "cache.json")
    cfg = TrainConfig(eval_cache=path, eval_sampled=2)
    recs = get_task("largest").splits(seed=0).heldout[:4]
    calls = []

    def compute(v):
        def f():
            calls.append(v)
            return EvalResult(n=4, greedy=v, greedy_interval=(0.1, 0.9), samples=2, sampled=v / 2,
                              sampled_interval=(0.0, 0.5))
        return f

    first = cached_evaluation(cfg, recs, compute(0.5))
    again = cached_evaluation(cfg, recs, compute(0.25))
    assert calls == [0.5] and again == first
    other = cached_evaluation(cfg, recs[:3], compute(0.75))  # other records (another seed's split): recomputed
    hotter = cached_evaluation(TrainConfig(eval_cache=path, eval_sampled=2, temperature=1.0), recs, compute(1.0))
    assert calls == [0.5, 0.75, 1.0] and other.greedy == 0.75 and hotter.greedy == 1.0
    # the same records scored by another task (largest_shortcut also reports the shortcut rate): recomputed
    shortcut = cached_evaluation(TrainConfig(eval_cache=path, eval_sampled=2, task="largest_shortcut"), recs,
                                 compute(0.0625))
    assert shortcut.greedy == 0.0625 and len(calls) == 4
    assert len(json.load(open(path))) == 4
    # training options that do not change the untrained model's evaluation share the entry
    same = TrainConfig(eval_cache=path, eval_sampled=2, method="grpo", lr=1e-3)
    assert base_eval_key(same, recs) == base_eval_key(cfg, recs)
    assert cached_evaluation(same, recs, compute(0.0)) == first and len(calls) == 4
    # no cache: always computed
    assert cached_evaluation(TrainConfig(), recs, compute(0.125)).greedy == 0.125


def test_cached_evaluation_rejects_a_corrupt_file(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="--eval-cache"):
        cached_evaluation(TrainConfig(eval_cache=str(path)), [], lambda: None)


def test_config_validates_eval_fields():
    with pytest.raises(ValueError, match="eval_sampled"):
        TrainConfig(eval_sampled=-1)
    with pytest.raises(ValueError, match="n_heldout"):
        TrainConfig(n_heldout=-2)


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TEST_TOKENIZER, reason="the tiny test model borrows SmolLM2's tokenizer")
def test_trainer_logs_sampled_eval_and_reuses_the_cached_base_eval(tiny_model_dir, tmp_path, monkeypatch):
    import credit.trainer as trainer
    from credit.logger import read_metrics

    calls = []
    real = trainer.evaluate_heldout

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(trainer, "evaluate_heldout", counting)
    base = dict(model=tiny_model_dir, max_steps=1, prompts_per_step=3, rollouts_per_prompt=2, max_new_tokens=4,
                micro_batch=4, eval_max=3, eval_sampled=2, eval_every=0, save_every=0, sample_every=0,
                progress=False, eval_cache=str(tmp_path / "cache.json"))
    s1 = trainer.train(TrainConfig(**base, method="grpo", output=str(tmp_path / "a")))
    s2 = trainer.train(TrainConfig(**base, method="sdpo", output=str(tmp_path / "b")))
    s3 = trainer.train(TrainConfig(**base, method="grpo", output=str(tmp_path / "c")))
    assert len(calls) == 4  # base eval once, then one final eval per run
    assert s1["eval_results"][0] == s2["eval_results"][0] and s1["accuracy_before"] == s2["accuracy_before"]
    # reading the base eval from the cache changes nothing downstream: the same run as computing it
    assert s3["eval_results"] == s1["eval_results"]
    m1, m3 = (read_metrics(os.path.join(tmp_path, d, "metrics.jsonl"))[-1] for d in ("a", "c"))
    assert m1["train/loss"] == m3["train/loss"] and m1["train/grad_norm"] == m3["train/grad_norm"]
    rows = read_metrics(os.path.join(tmp_path, "b", "metrics.jsonl"))
    assert rows[0]["step"] == 0 and "eval/accuracy_sampled" in rows[0] and "eval/accuracy_lo" in rows[0]
    assert "eval/accuracy_sampled" in rows[-1]
    step, res = s2["eval_results"][-1]
    assert step == 1 and res["n"] == 3 and res["samples"] == 2
