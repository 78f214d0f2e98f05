"""The logprob benchmark: a smoke run of the script (CI) and a pytest-benchmark suite for trends.

    python -m pytest bench/test_bench_logprob.py --benchmark-only     # timings, never asserted
"""

import json

import pytest
import torch

from bench import bench_logprob

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASE = (4096, 3584, 151936) if DEVICE.type == "cuda" else (128, 64, 5003)
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def test_script_writes_results_with_peers(tmp_path):
    out = tmp_path / "logprob.json"
    bench_logprob.main(["--smoke", "--out", str(out), "--providers", "matmul,naive,chunked,torch_lce,liger,credit"])
    doc = json.loads(out.read_text())
    assert {"card", "torch", "triton", "commit"} <= doc["meta"].keys()
    rows = doc["results"]
    timed = {(r["provider"], r["mode"]) for r in rows if "ms" in r}
    for mode in ("fwd", "fwdbwd"):
        assert {("matmul", mode), ("naive", mode), ("credit", mode)} <= timed
    for r in rows:
        if "ms" in r and r["provider"] != "matmul":
            assert r["max_abs_err_logp"] < 1e-4, r
            assert r["x_matmul_floor"] > 0
        if r["mode"] == "fwdbwd" and r["provider"] == "credit":
            assert r["rel_err_dhidden"] < 1e-4 and r["rel_err_dweight"] < 1e-4
    assert (tmp_path / "logprob.png").exists()


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("provider", ["matmul", "naive", "chunked", "torch_lce", "liger", "cce", "credit"])
def test_logprob_speed(benchmark, provider, mode):
    reason = bench_logprob.unavailable(provider, DEVICE)
    if reason:
        pytest.skip(reason)
    fn = bench_logprob.setup(CASE, provider, mode, DTYPE, DEVICE)
    if DEVICE.type == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
        benchmark(run)
    else:
        benchmark(fn)
