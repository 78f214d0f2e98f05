"""bench/study.py: the protocol builds valid configs, the queue and its slices, resuming, and the aggregation
(means, intervals, paired differences, the decision rule) against hand-computed values on synthetic run files;
one real run on the tiny model."""

import json
import os

import pytest

from bench import study
from credit.evaluation import mean_interval
from tests.utils import HAS_TEST_TOKENIZER


def test_every_task_and_config_builds_a_valid_train_config(tmp_path):
    for task in study.TASKS:
        for config in study.CONFIGS:
            cfg = study.run_config(task, config, 3, str(tmp_path), "cache.json")
            assert cfg.seed == 3 and cfg.task == task and cfg.max_steps == study.COMMON["max_steps"]
            assert cfg.output.endswith(study.run_name(task, config, 3))
    assert set(study.SDPO_TWIN.values()) <= set(study.CONFIGS)
    assert study.SDPO_TWIN["credit_lam1_mu0.5"] == "sdpo_mu0.5" and study.SDPO_TWIN["credit_lam0.5_topk"] == "sdpo_topk"
    for name in ("train", "heldout"):  # the mcq_plain data is committed
        assert os.path.exists(os.path.join(study.ROOT, study._MCQ.format(name)))


def test_committed_runs_are_what_the_protocol_builds_today():
    """Every committed run JSON recorded the TrainConfig that run_config builds now (paths aside): the protocol does
    not lean on TrainConfig's defaults, so the study's pick becoming the default changes none of its runs."""
    import glob

    paths = sorted(glob.glob(os.path.join(study.RESULTS, "study", "*__seed*.json")))
    assert paths
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        built = study.run_config(doc["task"], doc["config"], doc["seed"], "runs", "cache.json").to_dict()
        for key in ("output", "eval_cache"):
            built.pop(key), doc["train_config"].pop(key)
        assert doc["train_config"] == built, os.path.basename(path)
    for config, flags in study.CONFIGS.items():
        assert {"method", "lam", "mu", "level"} <= set(flags), config


def test_queue_slices_cover_the_queue_once():
    items = study.queue(list(study.TASKS), list(study.CONFIGS), list(study.SEEDS))
    assert len(items) == len(study.TASKS) * len(study.CONFIGS) * len(study.SEEDS) == 200
    assert items[0][2] == 0 and items[-1][2] == study.SEEDS[-1]  # seed-major
    parts = [study.select(items, (k, 7)) for k in range(1, 8)]
    assert sorted(x for p in parts for x in p) == sorted(items)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    done = {study.run_name(*i) for i in items[::3]}  # a resumed study: every third run finished
    left = study.remaining(items, done)
    assert len(left) == len(items) - len(done) and not {study.run_name(*i) for i in left} & done
    left_parts = [study.select(left, (k, 2)) for k in (1, 2)]
    assert abs(len(left_parts[0]) - len(left_parts[1])) <= 1
    assert study.parse_part("") == (1, 1) and study.parse_part("2/4") == (2, 4)
    for bad in ("0/3", "4/3", "x", "1-2"):
        with pytest.raises(ValueError, match="--parts"):
            study.parse_part(bad)
    with pytest.raises(ValueError, match="--configs: unknown"):
        study._pick("grpo,dpo", study.CONFIGS, "configs")


def _doc(task, config, seed, greedy, sampled, train_acc, shortcut=None):
    """A run JSON as run_one writes it: eval_results at steps 0, 10, 20, 20 step rows."""
    evals = [[s, {"n": 10, "greedy": g, "greedy_interval": [0, 1], "samples": 2, "sampled": sm,
                  "sampled_interval": [0, 1], "shortcut_greedy": None, "shortcut_sampled": None}]
             for s, g, sm in zip((0, 10, 20), greedy, sampled)]
    steps = []
    for st in range(1, 21):
        row = {"step": st, "train/accuracy": train_acc(st)}
        if shortcut is not None:
            row["task/shortcut_rate"] = shortcut(st)
        steps.append(row)
    return {"task": task, "config": config, "seed": seed, "wall_seconds": 100.0 + seed,
            "summary": {"eval_results": evals}, "steps": steps}


def _docs():
    docs = []
    for seed in range(3):
        for config, lift, rate in (("grpo", 0.10, 0.2), ("sdpo_mu0", 0.05, 0.4), ("credit_lam0.5_mu0", 0.15, 0.1),
                                   ("credit_lam1_mu0", 0.12, 0.05)):
            g = [0.3, 0.3 + lift, 0.3 + lift * (1 + seed / 10)]
            sm = [0.2, 0.2 + lift / 2, 0.2 + lift + seed / 100]
            docs.append(_doc("largest_shortcut", config, seed, g, sm,
                             lambda st, lift=lift, seed=seed: 0.3 + lift * st / 20 + seed / 50,
                             lambda st, rate=rate, seed=seed: rate + seed / 100))
    return docs


def test_summarize_means_intervals_paired_and_decision(monkeypatch):
    monkeypatch.setattr(study, "TASKS", {"largest_shortcut": study.TASKS["largest_shortcut"]})
    summary = study.summarize(_docs())
    rows = summary["tasks"]["largest_shortcut"]["configs"]
    credit = rows["credit_lam0.5_mu0"]
    gains = [0.15 * (1 + s / 10) for s in range(3)]
    want = mean_interval(gains)
    got = credit["greedy_gain"]
    assert (got["mean"], got["lo"], got["hi"]) == pytest.approx(want) and got["n"] == 3
    assert credit["greedy"]["10"]["mean"] == pytest.approx(0.45) and set(credit["greedy"]) == {"0", "10", "20"}
    sampled = [0.15 / 1 + s / 100 for s in range(3)]
    assert credit["sampled_gain"]["mean"] == pytest.approx(sum(sampled) / 3)
    # the selection window: mean train accuracy over steps 11..20, then over seeds
    win = [sum(0.3 + 0.15 * st / 20 + s / 50 for st in range(11, 21)) / 10 for s in range(3)]
    assert credit["train/accuracy window"]["mean"] == pytest.approx(sum(win) / 3)
    assert credit["task/shortcut_rate window"]["mean"] == pytest.approx(0.1 + 0.01)
    paired = summary["tasks"]["largest_shortcut"]["paired"]
    d = paired["credit_lam0.5_mu0 - sdpo_mu0"]
    diffs = [(0.15 - 0.05) * (1 + s / 10) for s in range(3)]
    assert (d["greedy_gain_diff"]["mean"], d["greedy_gain_diff"]["lo"]) == pytest.approx(mean_interval(diffs)[:2])
    assert d["shortcut_rate_diff"]["mean"] == pytest.approx(0.1 - 0.4)
    assert "credit_lam1_mu0 - grpo" in paired
    dec = summary["decision"]
    assert dec["leader"] == "credit_lam0.5_mu0"  # highest training accuracy in the window, not held-out
    assert dec["pick"] is None and not dec["complete"]  # 4 of the 10 configs: provisional, never the default
    assert "no pick, the study is not complete" in study.markdown(summary)
    assert "provisional leader on the configs run on every task: credit_lam0.5_mu0" in study.markdown(summary)
    goals = dec["goals"]["largest_shortcut"]
    assert goals["greedy_gain >= sdpo_mu0"] and goals["greedy_gain >= grpo"] and goals["shortcut rate < sdpo_mu0"]


def test_decision_needs_every_task_and_never_reads_held_out(monkeypatch):
    docs = _docs()
    # the full protocol: runs on one task of four pick nothing
    dec = study.summarize(docs)["decision"]
    assert dec["pick"] is None and not dec["complete"] and "largest" in dec["missing_tasks"]
    assert dec["runs"]["largest_shortcut"]["grpo"] == 3
    monkeypatch.setattr(study, "TASKS", {t: study.TASKS[t] for t in ("largest_shortcut", "largest")})
    # make the held-out gain of lam=1 enormous: the pick (training accuracy) must not change
    for d in docs:
        if d["config"] == "credit_lam1_mu0":
            d["summary"]["eval_results"][-1][1]["greedy"] = 1.0
    docs += [_doc("largest", c, s, [0.3, 0.4, 0.5], [0.2, 0.3, 0.4], lambda st: 0.5) for c in ("credit_lam0.5_mu0",
             "credit_lam1_mu0") for s in range(3)]
    dec = study.summarize(docs)["decision"]
    assert dec["leader"] == "credit_lam0.5_mu0" and dec["pick"] is None and not dec["complete"]  # 2 of 10 configs
    docs = [d for d in docs if not (d["task"] == "largest" and d["config"] == "credit_lam0.5_mu0")]
    assert study.summarize(docs)["decision"]["leader"] == "credit_lam1_mu0"  # the only one run on every task
    docs = [d for d in docs if d["task"] != "largest"]
    docs.append(_doc("largest", "grpo", 0, [0.5, 0.6, 0.7], [0.4, 0.5, 0.6], lambda st: 0.5))
    dec = study.summarize(docs)["decision"]
    assert dec["pick"] is None and "every task" in dec["why"]


def test_aggregate_writes_summary_and_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "TASKS", {"largest_shortcut": study.TASKS["largest_shortcut"]})
    # a complete study of 4 configs x 3 seeds on one task: the rule picks
    monkeypatch.setattr(study, "CONFIGS", {c: study.CONFIGS[c] for c in ("grpo", "sdpo_mu0", "credit_lam0.5_mu0",
                                                                          "credit_lam1_mu0")})
    out_dir = tmp_path / "runs"
    out_dir.mkdir()
    for d in _docs():
        (out_dir / (study.run_name(d["task"], d["config"], d["seed"]) + ".json")).write_text(json.dumps(d))
    monkeypatch.setattr(study, "RESULTS", str(tmp_path))
    assert study.main(["--aggregate", "--out-dir", str(out_dir)]) == 0
    summary = json.loads((tmp_path / "study_summary.json").read_text())
    assert summary["decision"]["pick"] == "credit_lam0.5_mu0" and summary["decision"]["complete"]
    assert (tmp_path / "study_largest_shortcut.png").stat().st_size > 1000
    table = (tmp_path / "study_summary.md").read_text()
    gain = summary["tasks"]["largest_shortcut"]["configs"]["credit_lam0.5_mu0"]["greedy_gain"]
    assert f"| credit_lam0.5_mu0 | 0,1,2 | 0.300 -> " in table and f"{gain['mean']:+.3f}" in table
    assert "Decision rule (complete study): pick credit_lam0.5_mu0 (selection score" in table
    goals = summary["decision"]["goals"]["largest_shortcut"]
    met = ", ".join(g for g, ok in goals.items() if ok) or "-"
    missed = ", ".join(g for g, ok in goals.items() if not ok) or "-"
    assert f"| largest_shortcut | {met} | {missed} |" in table and "shortcut rate < sdpo_mu0" in table
    assert "| credit_lam0.5_mu0 - sdpo_mu0 | 0,1,2 |" in table and "shortcut rate, steps 11-20" in table
    with pytest.raises(ValueError, match="no run JSON"):
        study.main(["--aggregate", "--out-dir", str(tmp_path / "empty")])


def test_readme_block_takes_the_summary_tables_and_keeps_the_prose(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "TASKS", {"largest_shortcut": study.TASKS["largest_shortcut"]})
    out_dir = tmp_path / "runs"
    out_dir.mkdir()
    for d in _docs():
        (out_dir / (study.run_name(d["task"], d["config"], d["seed"]) + ".json")).write_text(json.dumps(d))
    monkeypatch.setattr(study, "RESULTS", str(tmp_path))
    readme = tmp_path / "README.md"
    readme.write_text(f"# intro\n\n{study.README_BEGIN}\nold table\n{study.README_END}\n\nprose after\n")
    assert study.main(["--aggregate", "--out-dir", str(out_dir), "--readme", str(readme)]) == 0
    text = readme.read_text()
    tables = (tmp_path / "study_summary.md").read_text().strip()
    assert "old table" not in text and f"{study.README_BEGIN}\n\n{tables}\n\n{study.README_END}" in text
    assert text.startswith("# intro\n\n") and text.endswith("\n\nprose after\n")
    # a second aggregate of the same runs leaves the README as it is
    assert study.main(["--aggregate", "--out-dir", str(out_dir), "--readme", str(readme)]) == 0
    assert readme.read_text() == text
    # bad use: one line, exit 2
    readme.write_text("no block here\n")
    for argv in (["--aggregate", "--out-dir", str(out_dir), "--readme", str(readme)], ["--readme", str(readme)]):
        with pytest.raises(SystemExit) as exit_:
            study.main(argv)
        assert exit_.value.code == 2 and "--readme" in capsys.readouterr().err
    assert readme.read_text() == "no block here\n"


def test_the_repository_readme_quotes_the_committed_summary():
    """The README's study tables are exactly bench/results/study_summary.md (kept so by --aggregate --readme)."""
    with open(os.path.join(study.ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(study.RESULTS, "study_summary.md")) as f:
        tables = f.read()
    assert study.splice_readme(readme, tables) == readme


@pytest.mark.skipif(not HAS_TEST_TOKENIZER, reason="the tiny test model borrows SmolLM2's tokenizer")
def test_run_one_writes_its_json_drops_the_checkpoint_and_is_skipped_when_done(tiny_model_dir, tmp_path, capsys):
    kw = dict(model=tiny_model_dir, max_steps=2, eval_every=1, max_new_tokens=4, prompts_per_step=2,
              rollouts_per_prompt=2, eval_max=3, num_partners=1)
    doc = study.run_one("largest_shortcut", "credit_lam0.5_mu0.5", 0, runs=str(tmp_path / "runs"),
                        out_dir=str(tmp_path / "out"), eval_cache=str(tmp_path / "cache.json"), **kw)
    path = tmp_path / "out" / "largest_shortcut__credit_lam0.5_mu0.5__seed0.json"
    assert json.loads(path.read_text())["config"] == "credit_lam0.5_mu0.5"
    assert [s for s, _ in doc["summary"]["eval_results"]] == [0, 1, 2]
    assert all(r["samples"] == study.COMMON["eval_sampled"] for _, r in doc["summary"]["eval_results"])
    assert [s["step"] for s in doc["steps"]] == [1, 2] and "task/shortcut_rate" in doc["steps"][0]
    assert doc["train_config"]["mu"] == 0.5 and doc["train_config"]["lam"] == 0.5
    assert not (tmp_path / "runs" / "largest_shortcut__credit_lam0.5_mu0.5__seed0" / "ckpt").exists()
    assert json.loads((tmp_path / "cache.json").read_text())  # the step-0 eval was cached
    summary = study.summarize([doc])
    row = summary["tasks"]["largest_shortcut"]["configs"]["credit_lam0.5_mu0.5"]
    assert row["greedy_gain"]["lo"] is None and row["greedy_gain"]["n"] == 1  # one seed: no interval
    assert "(1 seed)" in study.markdown(summary) and "nan" not in study.markdown(summary)
    json.dumps(summary, allow_nan=False)  # valid JSON
    study.main(["--list", "--tasks", "largest_shortcut", "--configs", "credit_lam0.5_mu0.5", "--seeds", "0",
                "--out-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "todo  largest_shortcut" not in out and "0 to run in this part; 1 runs done" in out


def test_a_claimed_run_is_not_run_twice(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    with study.claimed(out, "a") as first:
        with study.claimed(out, "a") as second, study.claimed(out, "b") as other:
            assert first and not second and other  # one holder per run; other runs are free
        assert os.path.exists(os.path.join(out, "a.lock"))
    assert not os.listdir(out)  # lock files go when their run ends
    ran = []
    monkeypatch.setattr(study, "run_one", lambda t, c, s, **k: ran.append(study.run_name(t, c, s)))
    args = ["--tasks", "largest", "--configs", "grpo,sdpo_mu0", "--seeds", "0", "--out-dir", out,
            "--runs", str(tmp_path / "runs")]
    with study.claimed(out, "largest__grpo__seed0"):  # another process is running it
        study.main(args)
    assert ran == ["largest__sdpo_mu0__seed0"]
    ran.clear()
    os.makedirs(tmp_path / "runs")
    (tmp_path / "runs" / "STOP").write_text("")  # running processes finish their run and start no new one
    study.main(args)
    assert ran == []


def test_a_killed_holder_leaves_no_claim(tmp_path):
    import signal
    import subprocess
    import sys

    out = str(tmp_path / "out")
    code = (f"from bench import study; import time\nwith study.claimed({out!r}, 'a') as mine:\n"
            "    print(mine, flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(study.__file__)))
    try:
        assert holder.stdout.readline().strip() == "True"
        with study.claimed(out, "a") as mine:
            assert not mine
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with study.claimed(out, "a") as mine:  # the lock file is still there, its lock is not
            assert mine
    finally:
        holder.kill()


def test_train_config_defaults_follow_the_studys_pick():
    """`credit train` with no flags runs the committed study's pick (STUDY.md rule 2): its method, lam, mu and
    level are TrainConfig's defaults. The committed summary must hold a pick: the study is complete at 3 seeds."""
    from credit.config import TrainConfig

    with open(os.path.join(study.RESULTS, "study_summary.json")) as f:
        decision = json.load(f)["decision"]
    pick = decision.get("pick")
    assert decision["complete"] and pick in study.CONFIGS and pick.startswith("credit"), decision.get("why")
    default = TrainConfig()
    expected = dict(study.CONFIGS[pick])
    assert {k: getattr(default, k) for k in expected} == expected, pick
