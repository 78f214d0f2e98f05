"""The benchmark scripts' shared helpers: case selection, the GPU backward-shape rule, the learning summary."""

import argparse

import pytest
import torch

from bench import shapes
from bench.bench_learning import _mean_gains
from bench.common import add_logit_arguments, logit_case_modes, logit_run


def _args(*argv):
    p = argparse.ArgumentParser()
    add_logit_arguments(p, name="x", providers=["matmul", "credit"], providers_help="")
    return p.parse_args(list(argv))


def test_cases_are_selected_in_the_sets_order_and_unknown_ones_refused():
    assert shapes.select(shapes.LOGPROB_GPU, None) == shapes.LOGPROB_GPU
    picked = shapes.select(shapes.LOGPROB_GPU, "16384x1536x151936,1024x3584x151936")
    assert picked == [(1024, 3584, 151936), (16384, 1536, 151936)]
    with pytest.raises(SystemExit, match="not in the shape set"):
        shapes.select(shapes.LOGPROB_GPU, "7x7x7")


def test_logit_run_defaults_by_device_and_flags():
    device, shape_set, cases, dtype = logit_run(_args("--device", "cpu", "--smoke"))
    assert (device.type, shape_set, cases, dtype) == ("cpu", "smoke", shapes.LOGPROB_SMOKE, torch.float32)
    _, shape_set, cases, dtype = logit_run(_args("--device", "cpu", "--shapes", "gpu", "--dtype", "bf16",
                                                 "--cases", "8192x4096x128256"))
    assert (shape_set, cases, dtype) == ("gpu", [(8192, 4096, 128256)], torch.bfloat16)


def test_gpu_set_runs_the_backward_only_at_the_anchor_shapes():
    modes = ["fwd", "fwdbwd"]
    cuda = torch.device("cuda")
    assert logit_case_modes(modes, shapes.LOGPROB_GPU_BWD[0], cuda, "gpu") == modes
    assert logit_case_modes(modes, (1024, 3584, 151936), cuda, "gpu") == ["fwd"]
    assert logit_case_modes(modes, (1024, 3584, 151936), torch.device("cpu"), "gpu") == modes


def test_mean_gain_per_label_over_seeds():
    rows = [{"label": "credit", "seed": s, "accuracy_before": 0.5, "accuracy_after": a}
            for s, a in [(0, 0.75), (1, 0.5)]] + [{"label": "grpo", "seed": 0, "accuracy_before": 0.5,
                                                    "accuracy_after": 0.25}]
    assert _mean_gains(rows) == {"credit": {"seeds": [0, 1], "mean_gain": 0.125},
                                 "grpo": {"seeds": [0], "mean_gain": -0.25}}
