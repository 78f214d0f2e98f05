"""CREDIT inside verl (``verl==0.9.1``): a distillation loss, the driver-side context step and a trainer.

Installing the package registers them with verl through the ``verl.plugins`` entry point (``plugin.py``). See
docs/verl.md. ``CreditPPOTrainer`` is imported lazily (it needs verl's ``verl-core`` extra: ray, TransferQueue).
"""

from credit.integrations.verl.contexts import CreditContexts, assemble_credit_fields, build_credit_contexts
from credit.integrations.verl.loss import CREDIT_LOSS_NAME, CreditLossConfig, credit_distillation_loss

__all__ = [
    "CREDIT_LOSS_NAME",
    "CreditContexts",
    "CreditLossConfig",
    "CreditPPOTrainer",
    "assemble_credit_fields",
    "build_credit_contexts",
    "credit_distillation_loss",
]


def __getattr__(name):
    if name == "CreditPPOTrainer":
        from credit.integrations.verl.trainer import CreditPPOTrainer

        return CreditPPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
