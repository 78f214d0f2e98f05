"""examples/verl/credit_trainer.yaml composes on verl 0.9.1's own config tree and yields what the run reads.

Nothing is launched (that needs Ray, GPUs and vLLM): this checks the composed config the way main_ppo reads it.
"""

import os

import pytest

pytest.importorskip("verl.protocol")
pytest.importorskip("transfer_queue")

from hydra import compose, initialize_config_dir  # noqa: E402
from verl.trainer.ppo.v1 import get_trainer_cls  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.config import DistillationConfig  # noqa: E402

from credit.integrations.verl.loss import CreditLossConfig  # noqa: E402
from credit.integrations.verl.trainer import CreditAgentLoopManager, CreditPPOTrainer, credit_loss_config  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "verl")


@pytest.fixture(scope="module")
def cfg():
    with initialize_config_dir(config_dir=os.path.abspath(EXAMPLES), version_base=None):
        return compose(config_name="credit_trainer", overrides=["data.train_files=/x.parquet",
                                                                "data.val_files=/y.parquet"])


def test_example_selects_the_credit_trainer_and_loss(cfg):
    assert cfg.trainer.use_v1 is True
    assert get_trainer_cls(cfg.trainer.v1.trainer_mode) is CreditPPOTrainer
    loss = credit_loss_config(cfg)
    assert isinstance(loss, CreditLossConfig)
    assert (loss.lam, loss.num_partners, loss.teacher, loss.use_policy_gradient) == (0.5, 1, "frozen", True)
    dist = omega_conf_to_dataclass(cfg.distillation)  # what the actor worker builds from it
    assert isinstance(dist, DistillationConfig) and isinstance(dist.distillation_loss, CreditLossConfig)
    # frozen teacher: verl must build the ref worker group, with no KL term
    assert cfg.actor_rollout_ref.actor.use_kl_loss is True and cfg.actor_rollout_ref.actor.kl_loss_coef == 0.0


def test_example_agent_loop_manager_loads(cfg):
    from verl.utils.import_utils import load_class_from_fqn

    fqn = cfg.actor_rollout_ref.rollout.agent.agent_loop_manager_class
    assert load_class_from_fqn(fqn, "AgentLoopManager") is CreditAgentLoopManager
