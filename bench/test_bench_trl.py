"""bench/bench_trl.py --smoke on CPU: every peer runs on the same rollouts and the JSON rows are complete."""

import json

import pytest

pytest.importorskip("trl", reason="bench_trl needs trl==1.16.0")


def test_bench_trl_smoke(tmp_path):
    from bench.bench_trl import main

    out = tmp_path / "trl.json"
    rows = main(["--smoke", "--out", str(out)])
    data = json.loads(out.read_text())
    assert [r["provider"] for r in data["results"]] == ["sdpo", "credit_M0", "credit_M1", "credit_M3"]
    assert data["meta"]["model"] == "smoke" and data["meta"]["trl"] == "1.16.0"
    for r in rows:
        median, p20, p80 = r["step_ms"]
        assert 0 < p20 <= median <= p80
        assert median > 0 and r["teacher_ms"] > 0
