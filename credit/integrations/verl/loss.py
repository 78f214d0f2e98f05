r"""CREDIT as a verl distillation loss (token level), for ``verl==0.9.1``.

The method (docs/method.md, arXiv 2605.11613): for response token y_t with student log-prob s, aligned teacher
log-prob a = log T(y_t | c(x, f), y_<t) and M shuffled-teacher log-probs b^m = log T(y_t | c(x_m, f), y_<t),

    r = a - s - lam * (beta - s),     beta = mean_m b^m ("mean") or logsumexp_m b^m - log M ("logmeanexp")

and the update is the per-token policy gradient with advantage r (stop-gradient). lam = 0 is SDPO (r = a - s).

verl's ``distillation_loss()`` wrapper calls a registered loss with ``(config, distillation_config, model_output,
data)`` and, with ``use_policy_gradient=True``, turns ``-loss.detach()`` into the advantages of its vanilla policy
loss. So ``credit_distillation_loss`` returns ``-r`` per token: verl's wrapper then applies exactly the CREDIT update,
with s = the worker's current log-probs (``model_output["log_probs"]``) and verl's own importance ratio and
aggregation (``actor.loss_agg_mode``).

The batch fields it reads, per response (response-aligned like verl's ``old_log_probs``; nested/jagged rows on the
workers, or padded ``[B, T]``), are written on the driver by ``CreditPPOTrainer`` (``contexts.py``):

* ``credit_teacher_logprobs``  [B, T]     a
* ``credit_shuffled_logprobs`` [B, T, M]  b (absent or M = 0 when lam = 0)
* ``credit_teacher_mask``      [B, T]     1 on response tokens whose response has feedback (a teacher signal)

Top-k (logit-level) CREDIT is not registered: in verl 0.9.1 a ``use_topk`` loss only post-processes what the
worker's logits processor computed, and that processor is hard-wired to forward KL against the *teacher's own* top-k
ids (``compute_topk_loss`` -> ``compute_forward_kl_topk``). The contrastive teacher needs the student's top-k ids
and the shuffled teachers' log-probs at those ids, which neither the processor nor ``compute_log_prob`` provides.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from verl.trainer.distillation.losses import DistillationLossSettings, register_distillation_loss
from verl.utils.metric import AggregationType, Metric
from verl.workers.config import DistillationLossConfig
from verl.workers.utils.padding import no_padding_2_padding

from credit.options import method_option_error
from credit.pipeline import CreditTeacher, TeacherLogprobs

__all__ = [
    "CREDIT_LOSS_NAME",
    "FIELD_MASK",
    "FIELD_SHUFFLED",
    "FIELD_TEACHER",
    "CreditLossConfig",
    "credit_distillation_loss",
    "register",
]

CREDIT_LOSS_NAME = "credit"
FIELD_TEACHER = "credit_teacher_logprobs"
FIELD_SHUFFLED = "credit_shuffled_logprobs"
FIELD_MASK = "credit_teacher_mask"

_TEACHERS = ("frozen", "live")


@dataclass
class CreditLossConfig(DistillationLossConfig):
    """verl's ``DistillationLossConfig`` plus CREDIT's options; select it with
    ``distillation.distillation_loss._target_=credit.integrations.verl.CreditLossConfig``.

    Defaults differ from verl's where CREDIT needs it: ``loss_mode="credit"``, ``use_policy_gradient=True`` (required),
    ``use_task_rewards=False`` (pure self-distillation; True mixes in verl's PPO loss on the task reward with
    ``distillation_loss_coef``), ``loss_max_clamp=None`` (no clamp of the token rewards).
    """

    loss_mode: str = CREDIT_LOSS_NAME
    use_task_rewards: bool = False
    loss_max_clamp: float | None = None
    use_policy_gradient: bool = True
    # credit
    lam: float = 0.5
    """Debiasing weight in [0, 1]: 0 = SDPO, 1 = the pure contrast a - beta."""
    baseline: str = "mean"
    """beta over the M shuffled teachers: "mean" or "logmeanexp"."""
    num_partners: int = 1
    """M shuffled contexts per response, 1 <= M <= P - 1 (P prompts in the global batch); 0 only with lam = 0."""
    swap: str = "input"
    """"input": c(x_j, f_i) (the partner's prompt, the response's own feedback); "context": c(x_j, f_j)."""
    seed: int = 0
    """Seed of the demonstration choice (seed * 31 + step) and the partners (seed * 17 + step), as in CreditTeacher."""
    # teacher and feedback (read by CreditPPOTrainer on the driver)
    teacher: str = "frozen"
    """"frozen": the ref worker group scores (initial weights); "live": the actor scores (current weights)."""
    success_threshold: float = 1.0
    """A rollout whose summed task reward is >= this counts as a successful demonstration for its siblings."""
    feedback_key: str = "feedback"
    """reward_extra_info key holding the environment's text feedback (absent = no text feedback)."""

    def __post_init__(self):
        register()  # the parent resolves loss_mode in verl's registry (a no-op once the plugin has run)
        super().__post_init__()
        fn = "CreditLossConfig"
        if not self.use_policy_gradient:
            raise ValueError(
                f"{fn}: use_policy_gradient must be True (CREDIT's token rewards enter verl's policy loss as "
                "advantages; backpropagating -r directly would give a gradient that ignores the teacher); got False"
            )
        wrong = method_option_error(lam=self.lam, num_partners=self.num_partners, baseline=self.baseline,
                                    swap=self.swap, min_partners=0)
        if wrong:
            raise ValueError(f"{fn}: {wrong[0]} {wrong[1]}; got {getattr(self, wrong[0])!r}")
        if self.teacher not in _TEACHERS:
            raise ValueError(
                f"{fn}: teacher must be one of {_TEACHERS} (verl has no EMA teacher; see docs/verl.md); "
                f"got {self.teacher!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"{fn}: seed must be an int; got {self.seed!r}")


def _padded(data, key: str, width: int, *, required: bool = True) -> torch.Tensor | None:
    """data[key] as a padded [B, width, ...] tensor (nested rows are padded with 0 on the right)."""
    if key not in data.keys():
        if required:
            raise KeyError(
                f"credit_distillation_loss: the batch has no field {key!r}; it is written by CreditPPOTrainer "
                "(trainer.v1.trainer_mode=credit) after the rollouts"
            )
        return None
    x = data[key]
    if x.is_nested:
        x = x.to_padded_tensor(0.0)
    if x.shape[1] > width:
        x = x[:, :width]
    elif x.shape[1] < width:
        pad = [0, 0] * (x.dim() - 2) + [0, width - x.shape[1]]
        x = F.pad(x, pad)
    return x


def credit_distillation_loss(
    config, distillation_config, model_output: dict, data
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The registered CREDIT loss: per-token ``-r`` ([B, T] fp32, 0 off the teacher mask) and metrics.

    Args:
        config: verl's ActorConfig (unused here; verl's wrapper aggregates with it).
        distillation_config: verl's DistillationConfig whose ``distillation_loss`` is a CreditLossConfig (a plain
            DistillationLossConfig runs with CREDIT's defaults lam = 0.5, baseline "mean").
        model_output: the worker's output; ``log_probs`` (nested over prompt + response) is s.
        data: the micro-batch TensorDict with the three ``credit_*`` fields (see the module docstring).

    Returns:
        (losses [B, T] fp32, metrics dict).
    """
    loss_cfg = distillation_config.distillation_loss
    lam = float(getattr(loss_cfg, "lam", 0.5))
    baseline = getattr(loss_cfg, "baseline", "mean")
    student = no_padding_2_padding(model_output["log_probs"], data)  # [B, T]
    width = student.shape[1]
    aligned = _padded(data, FIELD_TEACHER, width)
    mask = _padded(data, FIELD_MASK, width).bool()
    shuffled = _padded(data, FIELD_SHUFFLED, width, required=lam > 0)
    student = student.detach()
    if lam > 0:
        if shuffled is None or shuffled.dim() != 3 or shuffled.shape[-1] == 0:
            got = None if shuffled is None else tuple(shuffled.shape)
            raise ValueError(f"credit_distillation_loss: lam = {lam} needs {FIELD_SHUFFLED} of shape [B, T, M >= 1]; "
                             f"got {got}")
        shuffled = shuffled.permute(2, 0, 1)  # [M, B, T]
    else:
        shuffled = aligned.new_zeros((0, *aligned.shape))
    # the pipeline's own reward step (the fused credit_reward op), as the compact trainer and TRL run it
    teacher = CreditTeacher(None, None, method="credit" if lam > 0 else "sdpo", lam=lam, baseline=baseline)
    rewards = teacher.rewards(TeacherLogprobs(aligned, shuffled, mask.float(), mask.any(1)), student).rewards
    n = mask.sum().clamp(min=1)
    metrics = {
        "credit/reward_mean": Metric(AggregationType.MEAN, (rewards.sum() / n).detach()),
        "credit/teacher_token_frac": Metric(AggregationType.MEAN, mask.float().mean().detach()),
    }
    return -rewards, metrics


def register(name: str = CREDIT_LOSS_NAME) -> None:
    """Register ``credit_distillation_loss`` under ``name`` (verl raises if the name is taken; a repeat is a no-op)."""
    from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY

    if DISTILLATION_LOSS_REGISTRY.get(name) is credit_distillation_loss:
        return
    register_distillation_loss(DistillationLossSettings(names=[name], use_estimator=True))(credit_distillation_loss)
