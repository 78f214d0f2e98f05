"""bench/sweep_kernels.py on CPU (Triton interpreter, tiny shapes): every family runs its fixed config and one
override, the override really reaches the kernel, and every row is within its reference's tolerance."""

import json
import os

import pytest

from bench import sweep_kernels
from credit_kernels import _triton_utils as tu

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton interpreter")


def test_smoke_sweep_every_family(tmp_path):
    out = tmp_path / "sweep.json"
    sweep_kernels.main(["--smoke", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["meta"]["bench"] == "sweep_kernels" and doc["meta"]["smoke"]
    rows = doc["results"]
    assert {r["kernel"] for r in rows} == set(sweep_kernels.FAMILIES)
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0
        err = r.get("max_abs_err", r.get("rel_err_grad"))
        assert err is not None and err < 1e-4, r
    assert sum(r["config"] != "fixed" for r in rows) == len(sweep_kernels.FAMILIES)


def test_override_config_replaces_and_restores():
    import torch

    dev = torch.device("cpu")
    fixed = tu.config(dev, "dz")
    with tu.override_config("logprob_dz", BLOCK_V=128, num_warps=2):
        cfg = tu.config(dev, "dz")
        assert cfg["BLOCK_V"] == 128 and cfg["num_warps"] == 2 and cfg["BLOCK_N"] == fixed["BLOCK_N"]
        assert tu.config(dev, "fwd") == tu._base_config(dev, "fwd")  # other kernels untouched
        with tu.override_config("topk", BLOCK_N=16):
            assert tu.logits_config(dev, 40, "topk")["BLOCK_N"] == 16
        assert tu.logits_config(dev, 40, "topk")["BLOCK_N"] != 16
    assert tu.config(dev, "dz") == fixed
    with pytest.raises(ValueError, match="unknown kernel"):
        with tu.override_config("nope", BLOCK_N=1):
            pass
