"""The learning study of bench/STUDY.md: tasks x configs x seeds, run as a resumable queue, then aggregated.

    python bench/study.py --list                                   # the runs still to do
    python bench/study.py --tasks largest_shortcut --configs grpo,sdpo_mu0,credit_lam0.5_mu0 --seeds 0
    python bench/study.py --parts 3/8                              # the 3rd of 8 interleaved slices (1-based)
    python bench/study.py --aggregate                              # study_*.json + plots from finished runs
    touch runs/study/STOP                                          # running processes finish their run and exit
    python bench/study.py --base                                   # the untrained model on every task
    python bench/study.py --base-rate --rollout-steps 25           # largest_shortcut's base shortcut rate

Every run is `credit.trainer.train` with the protocol's settings (`COMMON`, plus the task's and the config's
options), writes its run directory under --runs (its checkpoint is deleted when the run ends: 1.5 GB each) and
one JSON under bench/results/study/ (`<task>__<config>__seed<s>.json`); a run whose JSON exists is skipped, so an
interrupted queue continues where it stopped. The step-0 evaluation of the untrained model is computed once per
(task, seed) and shared through the eval cache. Processes may share a queue: each run is claimed (`claimed`, a
lock file) before it starts, so none runs twice. On a GPU, start one process per slice (`--parts k/n`), or several
on the same arguments, side by side: the 135M model leaves the card mostly idle.

--aggregate reads every run JSON and writes bench/results/study_summary.json (per task and config: the mean
over seeds with a 95% t interval of the held-out greedy and sampled accuracy at every evaluation step, of the
gain, of the sampled training accuracy, of the shortcut rate; paired per-seed differences of each CREDIT config
against its SDPO twin and GRPO; the decision rule's pick) and study_<task>.png curves.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from credit.evaluation import mean_interval, proportion_interval  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
RUN_DIR = os.path.join(RESULTS, "study")

# ---------------------------------------------------------------------------------------------
# the protocol (bench/STUDY.md): change it only before the study's first result, and then in STUDY.md too
# ---------------------------------------------------------------------------------------------

SEEDS = (0, 1, 2, 3, 4)

# settings shared by every run: equal steps, rollouts and evaluation for every method
COMMON = dict(max_steps=20, prompts_per_step=4, rollouts_per_prompt=4, eval_every=5, eval_sampled=2, eval_seed=1234,
              save_every=0, sample_every=0, progress=False)

_MCQ = os.path.join("examples", "data", "mcq_basic_{}.jsonl")
TASKS = {
    "largest": dict(task="largest"),
    "first_letter": dict(task="first_letter"),
    "largest_shortcut": dict(task="largest_shortcut"),
    "mcq_plain": dict(task="mcq_plain", data=_MCQ.format("train"), eval_data=_MCQ.format("heldout")),
}
# the tasks with an input-generic shortcut: their runs log task/shortcut_rate, their tables and plots show it
SHORTCUT_TASKS = frozenset({"largest_shortcut"})

# every config names method, lam, mu and level: the study must not lean on TrainConfig's defaults, which its pick
# sets (rule 2); grpo ignores lam and mu, and they are pinned to the values its runs recorded
CONFIGS = {
    "grpo": dict(method="grpo", lam=0.5, mu=0.0, level="token"),
    "sdpo_mu0": dict(method="sdpo", lam=0.5, mu=0.0, level="token"),
    "sdpo_mu0.5": dict(method="sdpo", lam=0.5, mu=0.5, level="token"),
    "credit_lam0.5_mu0": dict(method="credit", lam=0.5, mu=0.0, level="token"),
    "credit_lam0.5_mu0.5": dict(method="credit", lam=0.5, mu=0.5, level="token"),
    "credit_lam1_mu0": dict(method="credit", lam=1.0, mu=0.0, level="token"),
    "credit_lam1_mu0.5": dict(method="credit", lam=1.0, mu=0.5, level="token"),
    "sdpo_topk": dict(method="sdpo", lam=0.5, mu=0.0, level="topk"),
    "credit_lam0.5_topk": dict(method="credit", lam=0.5, mu=0.0, level="topk"),
    "credit_lam1_topk": dict(method="credit", lam=1.0, mu=0.0, level="topk"),
}

# the SDPO run each CREDIT config is compared with: same mu and level, lam = 0
SDPO_TWIN = {name: "sdpo_" + name.split("_", 2)[2] for name in CONFIGS if name.startswith("credit")}

# decision rule: the training-split window that picks the default (never the held-out split)
SELECT_STEPS = (11, 20)


def run_name(task: str, config: str, seed: int) -> str:
    return f"{task}__{config}__seed{seed}"


def queue(tasks, configs, seeds) -> list[tuple[str, str, int]]:
    """Seed-major order, so a partial study has every config on seed 0 before any config on seed 1."""
    return [(t, c, s) for s in seeds for t in tasks for c in configs]


def run_config(task: str, config: str, seed: int, runs: str, eval_cache: str, **overrides):
    from credit.config import TrainConfig

    values = {**COMMON, **TASKS[task], **CONFIGS[config], "seed": seed, "eval_cache": eval_cache,
              "output": os.path.join(runs, run_name(task, config, seed)), **overrides}
    return TrainConfig(**values)


def run_one(task: str, config: str, seed: int, *, runs: str, out_dir: str, eval_cache: str, **overrides) -> dict:
    """Train one run and write its JSON: the summary, every step's metrics, the machine and the wall time."""
    from credit.logger import read_metrics
    from credit.trainer import train

    from bench.common import machine_info

    cfg = run_config(task, config, seed, runs, eval_cache, **overrides)
    t0 = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - t0
    rows = read_metrics(os.path.join(cfg.output, "metrics.jsonl"))
    steps = [{k: v for k, v in r.items() if isinstance(v, (int, float))} for r in rows if "train/accuracy" in r]
    import torch

    device = torch.device("cuda") if torch.cuda.is_available() and cfg.device != "cpu" else torch.device("cpu")
    doc = {"task": task, "config": config, "seed": seed, "wall_seconds": wall, "machine": machine_info(device),
           "torch_threads": torch.get_num_threads(), "train_config": cfg.to_dict(), "summary": summary,
           "steps": steps}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, run_name(task, config, seed) + ".json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    shutil.rmtree(os.path.join(cfg.output, "ckpt"), ignore_errors=True)  # 1.5 GB of weights and optimizer state
    print(f"study: {run_name(task, config, seed)} done in {wall:.0f} s: held-out {summary['accuracy_before']:.3f} "
          f"-> {summary['accuracy_after']:.3f}; wrote {path}", flush=True)
    return doc


def _pick(arg: str | None, known, what: str) -> list:
    if not arg:
        return list(known)
    out = [x.strip() for x in arg.split(",") if x.strip()]
    bad = [x for x in out if x not in known]
    if bad:
        raise ValueError(f"--{what}: unknown {bad}; known: {list(known)}")
    return out


def parse_part(text: str | None) -> tuple[int, int]:
    """'k/n' -> (k, n), 1 <= k <= n; None -> (1, 1)."""
    if not text:
        return 1, 1
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--parts must look like k/n (e.g. 2/4); got {text!r}") from None
    if not 1 <= k <= n:
        raise ValueError(f"--parts {text}: need 1 <= k <= n")
    return k, n


@contextlib.contextmanager
def claimed(out_dir: str, name: str):
    """Yield True when this process holds run `name`: an exclusive flock on <out_dir>/<name>.lock, so processes
    sharing one queue (overlapping --parts, or several started on the same arguments) never run the same run.
    The kernel drops the lock of a killed process, so no claim outlives its run; the file goes when it ends."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name + ".lock")
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # while still locked: a process that opened it before sees the run's JSON


def remaining(items: list, done: set[str]) -> list:
    """The queue less its finished runs: parts are sliced from this, so parts started on a resumed study
    get about equal shares of what is left (slicing the whole queue could leave one part all done)."""
    return [i for i in items if run_name(*i) not in done]


def select(items: list, part: tuple[int, int]) -> list:
    """The k-th of n interleaved slices (items k-1, k-1+n, ...): slices of about equal cost."""
    k, n = part
    return items[k - 1::n]


# ---------------------------------------------------------------------------------------------
# the untrained model
# ---------------------------------------------------------------------------------------------


def base_rate(steps: int, seed: int, out: str) -> dict:
    """largest_shortcut's base shortcut rate: `steps` batches of training rollouts (P x G each, the protocol's
    sampling settings) of the UNTRAINED model, the fraction that take the shortcut, its 95% Wilson interval, and
    every reply (so another shortcut can be rescored from the file)."""
    from credit.trainer import rollout, setup

    cfg = run_config("largest_shortcut", "grpo", seed, os.path.join(ROOT, "runs", "study_base"), "")
    t0 = time.perf_counter()
    run = setup(cfg)
    rows = []
    for step in range(steps):
        batch, records, _ = rollout(cfg, step, run.student, run.tokenizer, run.env, run.train_records)
        rb = getattr(batch, "rollout", batch)  # the teacher's view: texts, success, outcome
        g = cfg.rollouts_per_prompt
        rows += [{"step": step, "input": records[i // g]["input"], "text": t, "success": bool(rb.success[i]),
                  "shortcut": run.env.uses_shortcut(t), "reward": float(rb.outcome[i])}
                 for i, t in enumerate(rb.texts)]
    n, k = len(rows), sum(r["shortcut"] for r in rows)
    lo, hi = proportion_interval(k, n)
    doc = {"task": "largest_shortcut", "shortcut": run.env.__class__.uses_shortcut.__doc__, "seed": seed,
           "rollouts": n, "shortcut_count": k, "shortcut_rate": k / n, "interval_95": [lo, hi],
           "shortcut_and_wrong": sum(r["shortcut"] and not r["success"] for r in rows),
           "accuracy": sum(r["success"] for r in rows) / n, "seconds": time.perf_counter() - t0,
           "settings": {k2: getattr(cfg, k2) for k2 in ("temperature", "top_p", "max_new_tokens", "prompts_per_step",
                                                         "rollouts_per_prompt")},
           "rows": rows}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"largest_shortcut base shortcut rate {k}/{n} = {k / n:.3f} (95% {lo:.3f}-{hi:.3f}); wrote {out}")
    return doc


def base_eval(tasks, seeds, eval_cache: str, out: str) -> dict:
    """The untrained model's held-out greedy and sampled accuracy on each task and seed (the protocol's eval,
    through the same cache the runs read, so it is computed once)."""
    from credit.evaluation import cached_evaluation, evaluate_heldout
    from credit.trainer import setup

    table = {}
    if os.path.exists(out):
        with open(out) as f:
            table = json.load(f).get("results", {})
    for task in tasks:
        for seed in seeds:
            key = f"{task}__seed{seed}"
            if key in table:
                continue
            cfg = run_config(task, "grpo", seed, os.path.join(ROOT, "runs", "study_base"), eval_cache)
            t0 = time.perf_counter()
            run = setup(cfg)
            device = next(run.student.parameters()).device
            res = cached_evaluation(cfg, run.heldout, lambda: evaluate_heldout(
                run.student, run.tokenizer, run.env, run.heldout, cfg, sampler=run.sampler), device=str(device))
            table[key] = {"task": task, "seed": seed, **res.to_dict(), "seconds": time.perf_counter() - t0}
            print(f"base {key}: greedy {res.greedy:.3f} {res.greedy_interval}, sampled {res.sampled:.3f} "
                  f"(n={res.n}, {table[key]['seconds']:.0f} s)", flush=True)
            with open(out, "w") as f:
                json.dump({"protocol": COMMON, "results": table}, f, indent=1)
    return table


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------


def load_runs(out_dir: str) -> list[dict]:
    docs = []
    for path in sorted(glob.glob(os.path.join(out_dir, "*__*__seed*.json"))):
        with open(path) as f:
            docs.append(json.load(f))
    return docs


def _ci(values: list[float]) -> dict:
    """Mean and 95% t interval over seeds; one seed has no interval (lo = hi = None: JSON has no NaN)."""
    mean, lo, hi = mean_interval(values)
    if len(values) == 1:
        lo = hi = None
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(values)}


def _evals(doc: dict, key: str) -> dict[int, float]:
    """{step: value} of one eval field ('greedy', 'sampled', 'shortcut_sampled', ...) of a run."""
    return {int(s): r[key] for s, r in doc["summary"]["eval_results"] if r.get(key) is not None}


def _window(doc: dict, key: str, lo: int, hi: int) -> float | None:
    vals = [s[key] for s in doc["steps"] if lo <= s["step"] <= hi and key in s]
    return sum(vals) / len(vals) if vals else None


def summarize(docs: list[dict]) -> dict:
    """Per task and config: mean and 95% interval over seeds of every curve and gain; paired comparisons; the
    decision rule's pick (bench/STUDY.md)."""
    out: dict = {"protocol": {"common": COMMON, "tasks": TASKS, "configs": CONFIGS, "select_steps": SELECT_STEPS},
                 "tasks": {}}
    by = {}
    for d in docs:
        by.setdefault(d["task"], {}).setdefault(d["config"], {})[d["seed"]] = d
    for task, configs in by.items():
        rows = {}
        for config, seeds in configs.items():
            runs = [seeds[s] for s in sorted(seeds)]
            row = {"seeds": sorted(seeds)}
            for key in ("greedy", "sampled", "shortcut_greedy", "shortcut_sampled"):
                curves = [_evals(d, key) for d in runs]
                common = sorted(set.intersection(*(set(c) for c in curves))) if curves and all(curves) else []
                if not common:
                    continue
                row[key] = {str(step): _ci([c[step] for c in curves]) for step in common}
                row[f"{key}_gain"] = _ci([c[common[-1]] - c[common[0]] for c in curves])
            steps = sorted({s["step"] for d in runs for s in d["steps"]})
            for key in ("train/accuracy", "task/shortcut_rate"):
                if all(any(key in s for s in d["steps"]) for d in runs):
                    row[key] = {str(st): _ci([next(s[key] for s in d["steps"] if s["step"] == st) for d in runs])
                                for st in steps if all(any(s["step"] == st and key in s for s in d["steps"])
                                                       for d in runs)}
                    window = [_window(d, key, *SELECT_STEPS) for d in runs]
                    if all(w is not None for w in window):  # runs shorter than the window have none
                        row[key + " window"] = _ci(window)
            row["wall_seconds"] = _ci([d["wall_seconds"] for d in runs])
            rows[config] = row
        out["tasks"][task] = {"configs": rows, "paired": _paired(configs)}
    out["decision"] = decide(out)
    return out


def _paired(configs: dict) -> dict:
    """Each CREDIT config minus its SDPO twin and minus GRPO, per seed (same seed: same split and base eval), on the
    held-out greedy and sampled gain and on the shortcut rates: mean difference and 95% interval."""
    out = {}
    for name in configs:
        if not name.startswith("credit"):
            continue
        for other in (SDPO_TWIN[name], "grpo"):
            if other not in configs:
                continue
            seeds = sorted(set(configs[name]) & set(configs[other]))
            if not seeds:
                continue
            cmp = {"seeds": seeds}
            for key in ("greedy", "sampled"):
                diffs = []
                for s in seeds:
                    a, b = _evals(configs[name][s], key), _evals(configs[other][s], key)
                    if a and b:
                        diffs.append((a[max(a)] - a[min(a)]) - (b[max(b)] - b[min(b)]))
                if diffs:
                    cmp[f"{key}_gain_diff"] = _ci(diffs)
            rates = [(_window(configs[name][s], "task/shortcut_rate", *SELECT_STEPS),
                      _window(configs[other][s], "task/shortcut_rate", *SELECT_STEPS)) for s in seeds]
            if all(a is not None and b is not None for a, b in rates):
                cmp["shortcut_rate_diff"] = _ci([a - b for a, b in rates])
            out[f"{name} - {other}"] = cmp
    return out


def decide(summary: dict) -> dict:
    """The pre-registered rule (bench/STUDY.md): the CREDIT config with the highest mean over tasks of its mean
    sampled TRAINING accuracy over steps SELECT_STEPS; then the goals, checked on the held-out split.

    `pick` is set only for a complete study (every config of the protocol on every task with >= 3 seeds): the rule
    chooses among all its CREDIT configs, not the ones run so far. Before that, `leader` is the rule applied to
    the configs run on every task, with its goals: provisional, reported as such, never the default."""
    tasks = summary["tasks"]
    # a partial study picks nothing: the rule averages over every task of the protocol, not the ones run so far
    missing = [t for t in TASKS if t not in tasks]
    runs = {t: {c: len(tasks[t]["configs"][c]["seeds"]) for c in tasks[t]["configs"]} for t in tasks}
    complete = not missing and all(runs[t].get(c, 0) >= 3 for t in TASKS for c in CONFIGS)
    scores = {}
    for name in (c for c in CONFIGS if c.startswith("credit")):
        vals = [tasks[t]["configs"][name]["train/accuracy window"]["mean"] for t in TASKS
                if t in tasks and name in tasks[t]["configs"] and "train/accuracy window" in tasks[t]["configs"][name]]
        if len(vals) == len(TASKS):
            scores[name] = sum(vals) / len(vals)
    if not scores:
        return {"pick": None, "complete": False, "missing_tasks": missing, "runs": runs,
                "why": "no CREDIT config has finished runs on every task of the protocol"}
    leader = max(scores, key=lambda c: (round(scores[c], 6), -list(CONFIGS).index(c)))
    goals = {}
    for task, t in tasks.items():
        rows, g = t["configs"], {}
        for other in (SDPO_TWIN[leader], "grpo"):
            if other in rows and leader in rows:
                for key in ("greedy_gain", "sampled_gain"):
                    if key in rows[leader] and key in rows[other]:
                        g[f"{key} >= {other}"] = rows[leader][key]["mean"] >= rows[other][key]["mean"]
        twin = SDPO_TWIN[leader]
        if task in SHORTCUT_TASKS and twin in rows and "task/shortcut_rate window" in rows.get(leader, {}):
            g[f"shortcut rate < {twin}"] = (rows[leader]["task/shortcut_rate window"]["mean"]
                                            < rows[twin]["task/shortcut_rate window"]["mean"])
        goals[task] = g
    out = {"pick": leader if complete else None, "leader": leader, "complete": complete, "runs": runs,
           "selection_score": scores, "goals": goals}
    if not complete:
        out["why"] = "the study is not complete (every config on every task with >= 3 seeds): leader is provisional"
    return out


def plot(summary: dict, out_prefix: str) -> list[str]:
    """study_<task>.png: held-out greedy and sampled accuracy and sampled training accuracy against steps, mean over
    seeds with the 95% band, one line per config; the shortcut rate too on largest_shortcut."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task, t in summary["tasks"].items():
        panels = [("greedy", "held-out accuracy, greedy"), ("sampled", "held-out accuracy, sampled"),
                  ("train/accuracy", "training accuracy (rollouts)")]
        if task in SHORTCUT_TASKS:
            panels.append(("task/shortcut_rate", "shortcut rate (rollouts)"))
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
        for ax, (key, title) in zip(axes[0], panels):
            for i, (config, row) in enumerate(t["configs"].items()):
                if key not in row:
                    continue
                xs = [int(s) for s in row[key]]
                m = [row[key][s]["mean"] for s in row[key]]
                bands = [_unit(row[key][s]["lo"], row[key][s]["hi"]) for s in row[key] if row[key][s]["n"] > 1]
                style = "-" if "mu0.5" in config or config == "grpo" else ("--" if "topk" in config else ":")
                ax.plot(xs, m, style, color=f"C{i}", marker="o" if len(xs) < 8 else None, ms=3,
                        label=f"{config} (n={len(row['seeds'])})")
                if len(bands) == len(xs):  # one seed: no band
                    ax.fill_between(xs, *zip(*bands), color=f"C{i}", alpha=0.12)
            ax.set_title(f"{task}: {title}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=6)
        fig.tight_layout()
        path = f"{out_prefix}_{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
        print(f"wrote {path}")
    return paths


def _unit(lo: float, hi: float) -> tuple[float, float]:
    """A rate's t interval from 2-3 seeds can leave [0, 1]: clipped for display (the JSON keeps it)."""
    return max(0.0, lo), min(1.0, hi)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(summary: dict) -> str:
    """The README's tables: per task, one row per config (mean over seeds [95% t interval]) and the paired
    differences; written next to study_summary.json so the README quotes the code's numbers, not hand copies."""

    def cell(r: dict | None, signed: bool) -> str:
        """mean [95% interval], or "(1 seed)" where one seed gives no interval; levels are clipped to [0, 1]."""
        if r is None:
            return "-"
        if r["lo"] is None:
            return f"{r['mean']:{'+' if signed else ''}.3f} (1 seed)"
        lo, hi = (r["lo"], r["hi"]) if signed else _unit(r["lo"], r["hi"])
        return f"{r['mean']:+.3f} [{lo:+.2f}, {hi:+.2f}]" if signed else f"{r['mean']:.3f} [{lo:.2f}, {hi:.2f}]"

    def ci(r: dict | None) -> str:  # a signed difference or gain
        return cell(r, signed=True)

    def level(r: dict | None) -> str:  # a rate in [0, 1]
        return cell(r, signed=False)

    lines = []
    for task, t in summary["tasks"].items():
        shortcut = task in SHORTCUT_TASKS
        rows = []
        for config in (c for c in CONFIGS if c in t["configs"]):
            row = t["configs"][config]
            curve = row.get("greedy", {})
            first, last = (curve[min(curve, key=int)], curve[max(curve, key=int)]) if curve else (None, None)
            ends = f"{first['mean']:.3f} -> {last['mean']:.3f}" if curve else "-"
            rows.append([config, ",".join(map(str, row["seeds"])), ends, ci(row.get("greedy_gain")),
                         ci(row.get("sampled_gain")), level(row.get("train/accuracy window"))]
                        + ([level(row.get("task/shortcut_rate window"))] if shortcut else []))
        lines += [f"**{task}**", ""] + _table(
            ["config", "seeds", "greedy, step 0 -> 20", "greedy gain", "sampled gain", "train accuracy, steps 11-20"]
            + (["shortcut rate, steps 11-20"] if shortcut else []), rows)
        if t["paired"]:
            pairs = [[name, ",".join(map(str, cmp["seeds"])), ci(cmp.get("greedy_gain_diff")),
                      ci(cmp.get("sampled_gain_diff"))] + ([ci(cmp.get("shortcut_rate_diff"))] if shortcut else [])
                     for name, cmp in t["paired"].items()]
            lines += [""] + _table(["paired, same seeds", "seeds", "greedy gain diff", "sampled gain diff"]
                                   + (["shortcut rate diff"] if shortcut else []), pairs)
        lines.append("")
    dec = summary["decision"]
    scores = ", ".join(f"{c} {v:.3f}" for c, v in sorted(dec.get("selection_score", {}).items(),
                                                      key=lambda kv: -kv[1]))
    if dec.get("pick"):
        lines.append(f"Decision rule (complete study): pick {dec['pick']} (selection score, training accuracy steps "
                     f"11-20 averaged over tasks: {scores}).")
        lines += ["", "| task | goals met (mean over seeds) | goals not met |", "|---|---|---|"]
        for task, goals in dec.get("goals", {}).items():
            met = [g for g, ok in goals.items() if ok]
            lines.append(f"| {task} | {', '.join(met) or '-'} | {', '.join(g for g in goals if g not in met) or '-'} |")
    else:
        lines.append("Decision rule: no pick, the study is not complete"
                     + (f" (tasks not yet run: {', '.join(dec['missing_tasks'])})" if dec.get("missing_tasks") else "")
                     + (f"; provisional leader on the configs run on every task: {dec['leader']} (selection score, "
                        f"training accuracy steps 11-20 averaged over tasks: {scores})" if dec.get("leader") else ""))
    return "\n".join(lines) + "\n"


README_BEGIN, README_END = "<!-- study tables: bench/study.py --aggregate --readme writes them -->", "<!-- /study tables -->"


def splice_readme(readme: str, tables: str) -> str:
    """The README's study tables replaced by `tables` (study_summary.md), between the two markers, so the README
    quotes exactly what the code computed; the prose around them stays the author's."""
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"--readme: the README has no '{README_BEGIN}' ... '{README_END}' block")
    return readme[:begin + len(README_BEGIN)] + "\n\n" + tables.strip() + "\n\n" + readme[end:]


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="", help=f"comma list of {list(TASKS)} (default: all)")
    p.add_argument("--configs", default="", help=f"comma list of {list(CONFIGS)} (default: all)")
    p.add_argument("--seeds", default="", help=f"comma list of seeds (default: {','.join(map(str, SEEDS))})")
    p.add_argument("--parts", default="", help="k/n: run only the k-th of n interleaved slices of the queue")
    p.add_argument("--list", action="store_true", help="print the queue and which runs are done; run nothing")
    p.add_argument("--aggregate", action="store_true", help="summarise finished runs: study_*.json and plots")
    p.add_argument("--readme", nargs="?", const=os.path.join(ROOT, "README.md"), default=None, metavar="PATH",
                   help="with --aggregate: also write the tables into the README's study block (default README.md)")
    p.add_argument("--base", action="store_true", help="evaluate the untrained model on the selected tasks/seeds")
    p.add_argument("--base-rate", action="store_true", help="measure largest_shortcut's base shortcut rate")
    p.add_argument("--rollout-steps", type=int, default=25, help="--base-rate: batches of P x G rollouts")
    p.add_argument("--device", default="auto", help="passed to every run (auto: cuda when available)")
    p.add_argument("--out-dir", default=RUN_DIR, help="one JSON per finished run")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "study"), help="parent of the run directories")
    p.add_argument("--eval-cache", default=os.path.join(RUN_DIR, "eval_cache.json"),
                   help="the shared step-0 evaluation cache")
    args = p.parse_args(argv)
    tasks = _pick(args.tasks, TASKS, "tasks")
    configs = _pick(args.configs, CONFIGS, "configs")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(SEEDS)
    part = parse_part(args.parts)
    if args.readme and not args.aggregate:
        p.error("--readme: only with --aggregate")
    if args.base_rate:
        seed = seeds[0]
        base_rate(args.rollout_steps, seed, os.path.join(RESULTS, "study_base_rate_largest_shortcut.json"))
        return 0
    if args.base:
        base_eval(tasks, seeds, args.eval_cache, os.path.join(RESULTS, "study_base.json"))
        return 0
    if args.aggregate:
        docs = load_runs(args.out_dir)
        if not docs:
            raise ValueError(f"--aggregate: no run JSON in {args.out_dir}")
        summary = summarize(docs)
        path = os.path.join(RESULTS, "study_summary.json")
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(RESULTS, "study_summary.md"), "w") as f:
            f.write(markdown(summary))
        print(f"wrote {path} and study_summary.md ({len(docs)} runs); decision: {summary['decision'].get('pick')}")
        if args.readme:
            with open(args.readme) as f:
                try:
                    text = splice_readme(f.read(), markdown(summary))
                except ValueError as e:
                    p.error(str(e))
            with open(args.readme, "w") as f:
                f.write(text)
            print(f"wrote the study tables into {args.readme}")
        plot(summary, os.path.join(RESULTS, "study"))
        return 0
    done = {os.path.basename(x)[:-5] for x in glob.glob(os.path.join(args.out_dir, "*__*__seed*.json"))}
    items = select(remaining(queue(tasks, configs, seeds), done), part)
    if args.list:
        for t, c, s in items:
            print(f"todo  {run_name(t, c, s)}")
        print(f"{len(items)} to run in this part; {len(done)} runs done in {args.out_dir}")
        return 0
    stop = os.path.join(args.runs, "STOP")
    for t, c, s in items:
        if os.path.exists(stop):
            print(f"study: {stop} exists: no new runs (delete it to go on)", flush=True)
            break
        with claimed(args.out_dir, run_name(t, c, s)) as mine:
            # re-checked under the claim: another process may have finished it since the queue was read
            if not mine or os.path.exists(os.path.join(args.out_dir, run_name(t, c, s) + ".json")):
                continue
            run_one(t, c, s, runs=args.runs, out_dir=args.out_dir, eval_cache=args.eval_cache, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
