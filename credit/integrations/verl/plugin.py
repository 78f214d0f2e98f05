"""verl plugin: loaded from our ``verl.plugins`` entry point on ``import verl`` (verl 0.9.1).

It registers the CREDIT distillation loss ``"credit"`` (``distillation.distillation_loss.loss_mode=credit``) and the
trainer ``"credit"`` (``trainer.v1.trainer_mode=credit``). ``VERL_USE_EXTERNAL_PLUGINS=none`` (or a list of names
without ``credit``) keeps verl from loading it. verl logs a plugin that fails to load only at DEBUG, so a failure to
register the trainer (verl's ``verl-core`` extra missing: ray, TransferQueue, ...) is logged here at WARNING and
the loss stays registered.
"""

from __future__ import annotations

import logging

from credit.integrations.verl.loss import register as _register_loss

logger = logging.getLogger(__name__)

_register_loss()

try:
    from credit.integrations.verl.trainer import CreditPPOTrainer  # noqa: F401  (registers "credit" on import)
except ImportError as e:  # verl-core extras missing: the loss works, the trainer needs them
    logger.warning("credit: verl trainer 'credit' not registered (%s); install verl's verl-core extra", e)
