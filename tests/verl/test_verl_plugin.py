"""The plugin registers on `import verl` (our verl.plugins entry point) and VERL_USE_EXTERNAL_PLUGINS turns it off.

Each case runs in a fresh interpreter, since verl reads the variable once, on its first import.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("verl.protocol")

PROBE = r"""
import json
import verl
from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY, DISTILLATION_SETTINGS_REGISTRY
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
loss = DISTILLATION_LOSS_REGISTRY.get("credit")
trainer = TRAINER_REGISTRY.get("credit")
print(json.dumps({
    "loss": None if loss is None else f"{loss.__module__}.{loss.__name__}",
    "estimator": None if loss is None else DISTILLATION_SETTINGS_REGISTRY["credit"].use_estimator,
    "trainer": None if trainer is None else f"{trainer.__module__}.{trainer.__name__}",
}))
"""


def _probe(policy):
    env = dict(os.environ)
    env.pop("VERL_USE_EXTERNAL_PLUGINS", None)
    if policy is not None:
        env["VERL_USE_EXTERNAL_PLUGINS"] = policy
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("policy", [None, "credit"])
def test_plugin_registers_loss_and_trainer_on_import_verl(policy):
    got = _probe(policy)
    assert got["loss"] == "credit.integrations.verl.loss.credit_distillation_loss"
    assert got["estimator"] is True
    assert got["trainer"] == "credit.integrations.verl.trainer.CreditPPOTrainer"


@pytest.mark.parametrize("policy", ["none", "some_other_plugin"])
def test_plugin_off(policy):
    assert _probe(policy) == {"loss": None, "estimator": None, "trainer": None}


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="verl.plugins")}
    assert eps.get("credit") == "credit.integrations.verl.plugin"
