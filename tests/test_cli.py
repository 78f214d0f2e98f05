"""The `credit` command line: user errors are one line on stderr and exit status 2, through the installed entry
point (the console script pip wrote next to this Python), with a traceback only under --debug / CREDIT_DEBUG=1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from credit.models import check_model_dir

CREDIT = Path(sys.executable).parent / "credit"


def run_credit(*args, env_extra=None, cwd=None):
    assert CREDIT.exists(), f"the `credit` entry point is not installed next to {sys.executable}"
    env = dict(os.environ)
    env.pop("CREDIT_DEBUG", None)
    env.update(env_extra or {})
    return subprocess.run([str(CREDIT), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def assert_one_line_error(proc, command: str, *needles: str, after_loading: bool = False):
    """Exit 2 and the error as one line; with after_loading, the model loader's progress lines may precede it."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    if after_loading:
        assert sum("error" in line for line in lines) == 1, proc.stderr
        lines = lines[-1:]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"credit {command}: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("args, needles", [
    (["--lam", "2"], ["--lam must be a number in [0, 1]", "got 2.0"]),
    (["--prompts-per-step", "1"], ["--prompts-per-step must be >= 2", "--method sdpo"]),
    (["--method", "foo"], ["--method must be one of"]),
    (["--lam", "abc"], ["argument --lam: invalid float value: 'abc'", "credit train --help"]),
    (["--bogus", "1"], ["unrecognized arguments: --bogus 1"]),
    (["--level", "topk", "--mu", "0.5"], ["--mu 0.5 with --level topk: pass --mu 0 there"]),
])
def test_bad_flags_are_one_line_exit_2_and_write_nothing(tmp_path, args, needles):
    out = tmp_path / "run"
    proc = run_credit("train", *args, "--output", str(out))
    assert_one_line_error(proc, "train", *needles)
    assert not out.exists()


def test_mu_default_is_the_studys_pick_and_topk_gets_zero():
    """mu's default (0.5, the learning study's pick) is the token level's: a topk run that leaves mu unset, from
    flags or a config file, gets 0; one that sets mu > 0 is refused, naming mu."""
    from credit.config import TrainConfig, build_config

    assert TrainConfig().mu == 0.5 and build_config({}).mu == 0.5
    assert build_config({"level": "topk"}).mu == 0.0 and build_config({"level": "token"}).mu == 0.5
    assert build_config({"level": "topk", "mu": 0.0}).mu == 0.0
    for make in (lambda: TrainConfig(level="topk"), lambda: build_config({"level": "topk", "mu": 0.25})):
        with pytest.raises(ValueError, match="`mu` .* with `level` topk: pass `mu` 0 there"):
            make()


def test_missing_and_malformed_data_files(tmp_path):
    out = tmp_path / "run"
    proc = run_credit("train", "--task", "mcq", "--data", str(tmp_path / "nope.jsonl"), "--output", str(out))
    assert_one_line_error(proc, "train", f"--data {tmp_path / 'nope.jsonl'}: no such file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "choices": ["a", "b"], "answer": "A"}\nnot json\n')
    proc = run_credit("train", "--task", "mcq", "--data", str(bad), "--output", str(out))
    assert_one_line_error(proc, "train", f"{bad}:2: not valid JSON")
    assert not out.exists()  # nothing of the run directory before the config and data are validated


def test_a_directory_that_is_not_a_model_says_what_is_missing(tmp_path):
    out = tmp_path / "run"
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_credit("train", "--model", str(empty), "--output", str(out))
    assert_one_line_error(proc, "train", "is not a causal-LM directory", "config.json is missing")
    assert "sentencepiece" not in proc.stderr and "tiktoken" not in proc.stderr
    assert not out.exists()
    proc = run_credit("train", "--model", str(tmp_path / "absent"), "--output", str(out))
    assert_one_line_error(proc, "train", "does not exist")


def test_debug_flag_and_env_show_the_traceback(tmp_path):
    for proc in (run_credit("train", "--lam", "2", "--debug"), run_credit("--debug", "train", "--lam", "2"),
                 run_credit("train", "--lam", "2", env_extra={"CREDIT_DEBUG": "1"})):
        assert proc.returncode != 0 and "Traceback" in proc.stderr and "--lam must be a number in [0, 1]" in proc.stderr


def test_eval_prints_greedy_interval_sampled_and_shortcut(tiny_model_dir):
    """credit eval: the task's held-out set (--n-heldout caps it), greedy accuracy with its 95% interval,
    --sampled K replies per input, and the shortcut rate on a task that has one."""
    import re

    proc = run_credit("eval", "--model", tiny_model_dir, "--task", "largest_shortcut", "--n-heldout", "6",
                      "--sampled", "2", "--max-new-tokens", "4", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"held-out accuracy: (\d\.\d{3}) greedy \(95% interval (\d\.\d{3})-(\d\.\d{3})\), "
                     r"(\d\.\d{3}) sampled \(2 per input\), shortcut rate (\d\.\d{3}) on 6 records of task "
                     r"largest_shortcut", line)
    assert m, line
    acc, lo, hi, sampled, shortcut = map(float, m.groups())
    assert lo <= acc <= hi and 0 <= sampled <= 1 and 0 <= shortcut <= 1


def test_eval_and_viz_errors(tmp_path, tiny_model_dir):
    proc = run_credit("eval", "--model", tiny_model_dir, "--run", str(tmp_path), "--device", "cpu")
    assert_one_line_error(proc, "eval", f"--run {tmp_path}: no checkpoint", after_loading=True)
    proc = run_credit("viz", "--run", str(tmp_path))
    assert_one_line_error(proc, "viz", "no samples/step_*.json")


# check_model_dir in-process: each missing piece is named.
def _model_dir(tmp_path, *, config=True, arch="LlamaForCausalLM", weights=True, tokenizer=True):
    d = tmp_path / "m"
    d.mkdir()
    if config:
        (d / "config.json").write_text(json.dumps({"architectures": [arch]}))
    if weights:
        (d / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (d / "tokenizer.json").write_text("{}")
    return str(d)


@pytest.mark.parametrize("kw, needle", [
    (dict(config=False), "config.json is missing"),
    (dict(arch="BertForMaskedLM"), "not a causal LM"),
    (dict(weights=False), "no weights"),
    (dict(tokenizer=False), "no tokenizer files"),
])
def test_check_model_dir_names_what_is_missing(tmp_path, kw, needle):
    with pytest.raises(ValueError, match=needle):
        check_model_dir(_model_dir(tmp_path, **kw))


def test_check_model_dir_accepts_a_saved_model(tiny_model_dir, tmp_path):
    check_model_dir(tiny_model_dir)
    check_model_dir(_model_dir(tmp_path))
