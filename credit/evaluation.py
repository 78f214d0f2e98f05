"""Held-out evaluation: greedy and sampled accuracy, the shortcut rate, and 95% intervals.

    res = evaluate_heldout(model, tokenizer, env, records, cfg, sampler=sampler)
    res.greedy, res.greedy_interval          # accuracy of greedy replies, Wilson 95% interval over records
    res.sampled, res.sampled_interval        # mean accuracy of cfg.eval_sampled replies per record (or None)
    res.metrics()                            # {"eval/accuracy": ..., "eval/accuracy_sampled": ..., ...}
    mean_interval([0.12, 0.2, 0.08])         # (mean, lo, hi): Student-t 95% interval, e.g. over seeds

Greedy accuracy is what a deployed model answers; on a small model one change of format flips many greedy
answers at once, so runs are also scored on sampled replies at the rollout temperature (cfg.eval_sampled per
record, seeded by cfg.eval_seed, the same seed at every evaluation of a run so curves compare like with like).
Methods are compared by the mean over seeds with `mean_interval`, never by one run.

The step-0 evaluation of the untrained model is the same for every method run on one (task, seed): with
cfg.eval_cache set, `cached_evaluation` computes it once and reads it back (`base_eval_key` names what it
depends on: model, dtype, held-out records, decoding settings).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

__all__ = [
    "EvalResult",
    "base_eval_key",
    "cached_evaluation",
    "evaluate",
    "evaluate_heldout",
    "mean_interval",
    "prompt_ids",
    "proportion_interval",
    "t_quantile",
]

# ---------------------------------------------------------------------------------------------
# intervals
# ---------------------------------------------------------------------------------------------


def proportion_interval(successes: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion successes / n (sound at 0 and n, unlike the normal one)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"proportion_interval: n must be an int >= 1; got {n!r}")
    if not 0 <= successes <= n:
        raise ValueError(f"proportion_interval: successes must be in [0, n={n}]; got {successes!r}")
    _check_level(level)
    z = math.sqrt(2.0) * _erfinv(level)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends where rounding would miss them
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def _t_abs_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df (Abramowitz & Stegun 26.7.3-4, finite sums)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 0:  # sin(th) (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2))
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if df == 1:
        return 2.0 * theta / math.pi
    term, total = 1.0, 1.0  # 2/pi (th + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ... up to c^(df-3)))
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2.0 / math.pi * (theta + s * math.cos(theta) * total)


def t_quantile(level: float, df: int) -> float:
    """The two-sided Student-t critical value: P(|T| <= q) = level, T with `df` (integer) degrees of freedom."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"t_quantile: df must be an int >= 1; got {df!r}")
    _check_level(level)
    lo, hi = 0.0, 1.0
    while _t_abs_cdf(hi, df) < level:
        hi *= 2.0
    for _ in range(200):  # bisection to machine precision
        mid = 0.5 * (lo + hi)
        if _t_abs_cdf(mid, df) < level:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def mean_interval(values: Sequence[float], *, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): the Student-t interval of the mean of `values` (e.g. one gain per seed). One value gives
    (v, nan, nan): a single run has no interval."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_interval: values is empty")
    if any(math.isnan(v) for v in vals):
        raise ValueError(f"mean_interval: values hold NaN: {vals}")
    _check_level(level)
    n = len(vals)
    mean = sum(vals) / n
    if n == 1:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(level, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level!r}")


def _erfinv(y: float) -> float:
    return float(torch.special.erfinv(torch.tensor(y, dtype=torch.float64)))


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------


def prompt_ids(tokenizer, env, record) -> list[int]:
    """The policy's prompt for `record`: the environment's user message in the chat template."""
    messages = [{"role": "user", "content": env.make_prompt(record)}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(messages[0]["content"])


@dataclass
class EvalResult:
    """One held-out evaluation. Rates are fractions in [0, 1]; sampled fields are None without sampling, shortcut
    fields None for a task without a shortcut (`uses_shortcut`)."""

    n: int                                        # held-out records
    greedy: float                                 # accuracy of the greedy reply
    greedy_interval: tuple[float, float]          # Wilson 95% interval over the n records
    samples: int = 0                              # sampled replies per record (cfg.eval_sampled)
    sampled: float | None = None                  # accuracy over all n * samples sampled replies
    sampled_interval: tuple[float, float] | None = None  # t 95% interval of the per-record mean accuracy
    shortcut_greedy: float | None = None          # fraction of greedy replies that take the task's shortcut
    shortcut_sampled: float | None = None         # fraction of sampled replies that take it

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        out = {f"{prefix}accuracy": self.greedy, f"{prefix}accuracy_lo": self.greedy_interval[0],
               f"{prefix}accuracy_hi": self.greedy_interval[1], f"{prefix}n": float(self.n)}
        if self.sampled is not None:
            out[f"{prefix}accuracy_sampled"] = self.sampled
            out[f"{prefix}accuracy_sampled_lo"], out[f"{prefix}accuracy_sampled_hi"] = self.sampled_interval
        if self.shortcut_greedy is not None:
            out[f"{prefix}shortcut_rate"] = self.shortcut_greedy
        if self.shortcut_sampled is not None:
            out[f"{prefix}shortcut_rate_sampled"] = self.shortcut_sampled
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EvalResult:
        d = dict(d)
        for k in ("greedy_interval", "sampled_interval"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


def _replies(sampler, tokenizer, env, records, num: int, *, greedy: bool, batch: int, seed: int | None):
    """Decoded replies, `num` per record, record-major."""
    texts = []
    per_call = max(1, batch // num)
    for start in range(0, len(records), per_call):
        chunk = records[start:start + per_call]
        outs = sampler.sample([prompt_ids(tokenizer, env, r) for r in chunk], num, greedy=greedy,
                              seed=None if seed is None else seed + start)
        texts.extend(tokenizer.decode(o, skip_special_tokens=True) for o in outs)
    return texts


@torch.no_grad()
def evaluate_heldout(model, tokenizer, env, records: list[dict], cfg, *, batch: int = 32, sampler=None,
                     sampled: int | None = None) -> EvalResult:
    """Greedy accuracy of `model` on `records`, plus sampled accuracy (`sampled` replies per record, default
    cfg.eval_sampled, at cfg.temperature / cfg.top_p, seeded by cfg.eval_seed) and the shortcut rate where the
    task has one. Generation goes through `sampler` (default: transformers generate on `model`). No records
    (a data task without --eval-data): n = 0 and nan accuracy."""
    k = cfg.eval_sampled if sampled is None else sampled
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"evaluate_heldout: sampled must be an int >= 0; got {k!r}")
    if batch < 1:
        raise ValueError(f"evaluate_heldout: batch must be >= 1; got {batch}")
    if not records:
        return EvalResult(n=0, greedy=float("nan"), greedy_interval=(float("nan"), float("nan")))
    if sampler is None:
        from credit.rollouts import HFSampler

        sampler = HFSampler(model, tokenizer, cfg)
    sampler.sync_weights(model)
    shortcut = getattr(env, "uses_shortcut", None)
    texts = _replies(sampler, tokenizer, env, records, 1, greedy=True, batch=batch, seed=None)
    hits = [env.score(r, t).success for r, t in zip(records, texts)]
    n = len(records)
    res = EvalResult(n=n, greedy=sum(hits) / n, greedy_interval=proportion_interval(sum(hits), n))
    if shortcut is not None:
        res.shortcut_greedy = sum(map(shortcut, texts)) / n
    if k:
        texts = _replies(sampler, tokenizer, env, records, k, greedy=False, batch=batch, seed=cfg.eval_seed)
        ok = [env.score(records[i // k], t).success for i, t in enumerate(texts)]
        per_record = [sum(ok[i * k:(i + 1) * k]) / k for i in range(n)]
        mean, lo, hi = mean_interval(per_record)
        res.samples, res.sampled = k, mean
        res.sampled_interval = (max(0.0, lo), min(1.0, hi)) if n > 1 else (float("nan"), float("nan"))
        if shortcut is not None:
            res.shortcut_sampled = sum(map(shortcut, texts)) / len(texts)
    return res


def evaluate(model, tokenizer, env, records: list[dict], cfg, batch: int = 32, sampler=None) -> float:
    """Held-out accuracy of `model` with greedy decoding (nan without records); `evaluate_heldout` gives more."""
    return evaluate_heldout(model, tokenizer, env, records, cfg, batch=batch, sampler=sampler, sampled=0).greedy


# ---------------------------------------------------------------------------------------------
# the step-0 cache
# ---------------------------------------------------------------------------------------------

# the config fields the untrained model's evaluation depends on (besides the records themselves)
# (the task too: two tasks may share records but score them differently, e.g. largest and largest_shortcut)
_KEY_FIELDS = ("task", "model", "dtype", "max_new_tokens", "temperature", "top_p", "eval_sampled", "eval_seed",
               "rollout")


def base_eval_key(cfg, records: list[dict], device: str = "") -> str:
    """A digest of everything the untrained model's evaluation depends on: the task (its scoring), the model, dtype
    and device, the decoding settings and the held-out records (so the split seed and n_heldout)."""
    what = {k: getattr(cfg, k) for k in _KEY_FIELDS} | {"device": str(device), "records": records}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cached_evaluation(cfg, records: list[dict], compute: Callable[[], EvalResult], device: str = "") -> EvalResult:
    """compute() (the untrained model's evaluation), read from / written to the JSON file cfg.eval_cache when it is
    set. Only for step 0: the cache knows nothing about trained weights."""
    path = getattr(cfg, "eval_cache", "")
    if not path:
        return compute()
    key = base_eval_key(cfg, records, device)
    table = _read_cache(path)
    if key in table:
        return EvalResult.from_dict(table[key]["result"])
    res = compute()
    table = _read_cache(path)  # another run may have written meanwhile
    table[key] = {"task": getattr(cfg, "task", None), "seed": getattr(cfg, "seed", None),
                  "model": cfg.model, "result": res.to_dict()}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".eval_cache-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1)
    os.replace(tmp, path)  # atomic: a reader sees the old or the new file, never half of one
    return res


def _read_cache(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            table = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--eval-cache {path}: not a JSON file ({e.msg}); delete it or pass another path") from None
    if not isinstance(table, dict):
        raise ValueError(f"--eval-cache {path}: expected a JSON object of cached evaluations")
    return table
