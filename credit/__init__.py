"""credit: CREDIT (arXiv 2605.11613), input-specific credit for on-policy self-distillation."""

__version__ = "0.1.0"

from credit.losses import (
    ContrastiveTeacher,
    TopkDivergence,
    contrastive_teacher_topk,
    grpo_advantages,
    mix_advantages,
    policy_gradient_loss,
    topk_divergence,
)
from credit.pairing import partners
from credit.pipeline import CreditTeacher, RolloutBatch, TeacherLogprobs, TokenRewards, TopkTeacher
from credit.rewards import SequencePMI, credit_rewards, sdpo_rewards, sequence_pmi
from credit.scoring import TeacherScorer, TeacherScores, TeacherTopk
from credit.templates import (
    DEFAULT_TEMPLATE,
    FeedbackSelection,
    TeacherPairs,
    TeacherTemplate,
    build_teacher_context,
    build_teacher_pairs,
    render_reprompt,
    select_feedback,
    strip_think,
)

__all__ = [
    "ContrastiveTeacher",
    "CreditTeacher",
    "DEFAULT_TEMPLATE",
    "FeedbackSelection",
    "SequencePMI",
    "TeacherPairs",
    "TeacherScorer",
    "TeacherScores",
    "TeacherLogprobs",
    "TeacherTemplate",
    "TeacherTopk",
    "TokenRewards",
    "TopkDivergence",
    "TopkTeacher",
    "build_teacher_context",
    "build_teacher_pairs",
    "contrastive_teacher_topk",
    "credit_rewards",
    "grpo_advantages",
    "mix_advantages",
    "partners",
    "policy_gradient_loss",
    "RolloutBatch",
    "render_reprompt",
    "sdpo_rewards",
    "select_feedback",
    "sequence_pmi",
    "strip_think",
    "topk_divergence",
]
