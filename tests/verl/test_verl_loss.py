"""The CREDIT loss through verl's own distillation_loss() wrapper (verl==0.9.1): value, gradient, options, errors.

Runs in the verl virtualenv (.ci/verl.sh); skipped where verl is not installed.
"""

import math

import pytest
import torch

pytest.importorskip("verl.protocol")
losses_mod = pytest.importorskip("verl.trainer.distillation.losses")

from tensordict import TensorDict  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import DistillationConfig, FSDPActorConfig  # noqa: E402

from credit.integrations.verl.loss import (  # noqa: E402
    FIELD_MASK,
    FIELD_SHUFFLED,
    FIELD_TEACHER,
    CreditLossConfig,
    credit_distillation_loss,
)
from credit.losses import policy_gradient_loss  # noqa: E402

PROMPT_LENS = [2, 3, 1]
RESP_LENS = [4, 2, 3]
M = 2


def jag(xs):
    return torch.nested.as_nested_tensor(list(xs), layout=torch.jagged)


def pad(rows, width, fill=0.0):
    out = torch.full((len(rows), width, *rows[0].shape[1:]), fill, dtype=torch.float64)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r.double()
    return out


def make_batch(seed=0, feedback=(True, False, True), tool_token=True):
    g = torch.Generator().manual_seed(seed)
    seq_lens = [p + r for p, r in zip(PROMPT_LENS, RESP_LENS)]
    values = (-torch.rand(sum(seq_lens), generator=g, dtype=torch.float64) * 3).float().requires_grad_(True)
    offsets = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()])
    log_probs = torch.nested.nested_tensor_from_jagged(values, offsets=offsets)
    # the response part of the student's log-probs, as verl aligns it (left shift by one)
    s_rows = [values[o + p - 1: o + p - 1 + r].detach() for o, p, r in zip(offsets.tolist(), PROMPT_LENS, RESP_LENS)]
    a_rows = [(-torch.rand(r, generator=g) * 3) for r in RESP_LENS]
    b_rows = [(-torch.rand(r, M, generator=g) * 3) for r in RESP_LENS]
    rmask_rows = [torch.ones(r, dtype=torch.int64) for r in RESP_LENS]
    if tool_token:
        rmask_rows[0][1] = 0  # a tool-output token: not trained on
    tmask_rows = [rm * int(f) for rm, f in zip(rmask_rows, feedback)]
    data = TensorDict(
        {
            "prompts": jag(torch.arange(p) + 1 for p in PROMPT_LENS),
            "responses": jag(torch.arange(r) + 1 for r in RESP_LENS),
            "response_mask": jag(rmask_rows),
            "old_log_probs": jag(s_rows),
            FIELD_TEACHER: jag(a_rows),
            FIELD_SHUFFLED: jag(b_rows),
            FIELD_MASK: jag(tmask_rows),
        },
        batch_size=[len(RESP_LENS)],
    )
    ntok = int(sum(rm.sum() for rm in rmask_rows))
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=ntok, global_batch_size=len(RESP_LENS))
    width = max(RESP_LENS)
    ref = dict(s=pad(s_rows, width), a=pad(a_rows, width), b=pad(b_rows, width), rmask=pad(rmask_rows, width),
               tmask=pad(tmask_rows, width), ntok=ntok)
    return values, log_probs, data, ref


def actor_config():
    return FSDPActorConfig(strategy="fsdp", rollout_n=2, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2,
                           use_dynamic_bsz=False, loss_agg_mode="token-mean")


def reference_advantage(ref, lam, baseline):
    """fp64 CREDIT token rewards r = a - s - lam (beta - s) on the teacher mask (docs/method.md)."""
    a, b, s = ref["a"], ref["b"], ref["s"]
    if baseline == "mean":
        beta = b.mean(-1)
    else:
        beta = torch.logsumexp(b, -1) - math.log(b.shape[-1])
    r = a - s - lam * (beta - s)
    return torch.where(ref["tmask"].bool(), r, torch.zeros_like(r))


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("baseline", ["mean", "logmeanexp"])
def test_credit_loss_through_verl_wrapper_matches_reference(lam, baseline):
    values, log_probs, data, ref = make_batch()
    dcfg = DistillationConfig(enabled=False, distillation_loss=CreditLossConfig(lam=lam, baseline=baseline))
    loss, metrics = losses_mod.distillation_loss(actor_config(), dcfg, {"log_probs": log_probs}, data)

    adv = reference_advantage(ref, lam, baseline)
    # verl's vanilla policy loss at ratio exp(s - s_old) = 1: value -sum(m A) / N, gradient -m A / N w.r.t. s
    expected = -(adv * ref["rmask"]).sum() / ref["ntok"]
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-6)
    loss.backward()
    grad = values.grad
    assert grad is not None and torch.isfinite(grad).all()
    offsets = [0, *torch.tensor([p + r for p, r in zip(PROMPT_LENS, RESP_LENS)]).cumsum(0).tolist()]
    for i, (o, p, r) in enumerate(zip(offsets, PROMPT_LENS, RESP_LENS)):
        got = grad[o + p - 1: o + p - 1 + r].double()
        torch.testing.assert_close(got, (-adv[i, :r] * ref["rmask"][i, :r]) / ref["ntok"], atol=1e-7, rtol=1e-6)
    # ...and the same gradient as our own policy_gradient_loss on the padded batch
    s = ref["s"].float().clone().requires_grad_(True)
    policy_gradient_loss(s, adv.float(), ref["rmask"].bool()).backward()
    padded_grad = torch.zeros_like(ref["s"])
    for i, (o, p, r) in enumerate(zip(offsets, PROMPT_LENS, RESP_LENS)):
        padded_grad[i, :r] = grad[o + p - 1: o + p - 1 + r].double()
    torch.testing.assert_close(padded_grad, s.grad.double(), atol=1e-7, rtol=1e-6)
    assert "credit/reward_mean" in metrics


def test_credit_loss_fn_returns_minus_reward_off_mask_zero():
    _, log_probs, data, ref = make_batch(seed=3)
    dcfg = DistillationConfig(enabled=False, distillation_loss=CreditLossConfig(lam=0.5))
    per_token, _ = credit_distillation_loss(actor_config(), dcfg, {"log_probs": log_probs}, data)
    expected = -reference_advantage(ref, 0.5, "mean")
    torch.testing.assert_close(per_token.double(), expected, atol=1e-6, rtol=1e-6)
    assert (per_token[1] == 0).all()  # response 1 has no feedback


def test_lam_zero_needs_no_shuffled_field():
    _, log_probs, data, ref = make_batch(seed=4)
    del data[FIELD_SHUFFLED]
    dcfg = DistillationConfig(enabled=False, distillation_loss=CreditLossConfig(lam=0.0, num_partners=0))
    per_token, _ = credit_distillation_loss(actor_config(), dcfg, {"log_probs": log_probs}, data)
    expected = -torch.where(ref["tmask"].bool(), ref["a"] - ref["s"], torch.zeros_like(ref["s"]))
    torch.testing.assert_close(per_token.double(), expected, atol=1e-6, rtol=1e-6)


def test_missing_field_names_it_and_the_trainer():
    _, log_probs, data, _ = make_batch()
    del data[FIELD_TEACHER]
    dcfg = DistillationConfig(enabled=False, distillation_loss=CreditLossConfig())
    with pytest.raises(KeyError, match="credit_teacher_logprobs.*CreditPPOTrainer"):
        credit_distillation_loss(actor_config(), dcfg, {"log_probs": log_probs}, data)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(use_policy_gradient=False), "use_policy_gradient must be True"),
        (dict(lam=1.5), "lam must be a number in \\[0, 1\\]"),
        (dict(baseline="max"), "baseline must be one of"),
        (dict(swap="prompt"), "swap must be one of"),
        (dict(teacher="ema"), "no EMA teacher"),
        (dict(num_partners=0), "num_partners = 0 means no shuffled teacher"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CreditLossConfig(**kwargs)


def test_config_is_a_verl_loss_config_with_credit_settings():
    cfg = CreditLossConfig()
    assert cfg.loss_mode == "credit"
    assert cfg.loss_settings.use_estimator and not cfg.loss_settings.use_topk
    assert losses_mod.get_distillation_loss_fn("credit") is credit_distillation_loss
