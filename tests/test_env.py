"""`credit env` reports versions and live backends."""

from credit.cli import main
from credit.env import env_report
from credit_kernels import _ext


def test_env_report_names_every_backend(capsys):
    report = env_report()
    backends = report["backends"]
    assert backends["C++ extension (credit_kernels._C)"].startswith("yes" if _ext.HAS_EXT else "no")
    assert {"CUDA extension", "Triton on GPU", "Triton interpreter (TRITON_INTERPRET=1)", "PyTorch reference"} <= set(
        backends
    )
    assert report["torch"] and "code sandbox" in report
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "C++ extension" in out
