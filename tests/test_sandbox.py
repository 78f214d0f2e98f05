"""The code sandbox against correct, wrong and hostile programs (credit.envs.sandbox, credit.envs.code.run_tests).

Every hostile program must be contained (the limit holds, nothing leaks to the host), reported as a failed
test with feedback, and leave the host and this test process unharmed: no sandbox process survives, no
temp dir stays behind, the host can still fork. Timeouts are short (2 s) to keep the file fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from credit.envs.code import CodeResult, extract_code, normalize_output, outputs_match, run_tests
from credit.envs.sandbox import _UID_BASE, _UID_SPAN, SandboxConfig, run_python, sandbox_report

IS_ROOT = os.geteuid() == 0
FAST = SandboxConfig(timeout_s=2.0, memory_mb=512, max_output_bytes=1 << 20)
NO_NS = SandboxConfig(timeout_s=2.0, memory_mb=512, max_output_bytes=1 << 20, namespaces=False)


@pytest.fixture(scope="module")
def layers() -> set[str]:
    return set(sandbox_report(FAST)["layers"])


def _prog(src: str) -> str:
    return textwrap.dedent(src).lstrip("\n")


def _sandbox_pids() -> list[int]:
    """Live (not zombie) processes owned by a sandbox uid. Zombies are dead; the host's init reaps them."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        uid = int(fields["Uid"].split()[0])
        if _UID_BASE <= uid < _UID_BASE + _UID_SPAN and not fields["State"].strip().startswith("Z"):
            out.append(int(d))
    return out


def _sandbox_dirs() -> set[str]:
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("credit-sbx-")}


@pytest.fixture
def host_unharmed():
    """Around a hostile run: no sandbox process or temp dir survives it, and the host can still fork."""
    dirs_before = _sandbox_dirs()
    yield
    deadline = time.monotonic() + 2.0
    while _sandbox_pids() and time.monotonic() < deadline:  # the kernel reaps a dead PID namespace async
        time.sleep(0.05)
    assert _sandbox_pids() == [], "a sandboxed process outlived its run"
    assert _sandbox_dirs() - dirs_before == set(), "a sandbox temp dir was left behind"
    r = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "42"


def _one(src: str, expected: str = "ok\n", stdin: str = "", config: SandboxConfig = FAST) -> CodeResult:
    return run_tests(_prog(src), [{"input": stdin, "output": expected}], timeout_s=config.timeout_s, config=config)


# --------------------------------------------------------------------------------------------------------------
# correct and wrong programs


def test_correct_program_passes_all_tests():
    prog = "a, b = map(int, input().split())\nprint(a + b)\n"
    tests = [
        {"input": "1 2\n", "output": "3\n"},
        {"input": "-5 5", "output": "0"},
        {"input": "10 20\n", "output": "30"},
    ]
    res = run_tests(prog, tests, timeout_s=2.0)
    assert (res.passed, res.num_passed, res.num_tests) == (True, 3, 3)
    assert res.feedback == "All 3 tests passed."
    assert [r.status for r in res.results] == ["passed"] * 3


def test_wrong_answer_feedback_shows_two_failing_tests():
    prog = "n = int(input())\nprint(n * 2 if n != 1 else 1)\n"  # should square
    tests = [{"input": f"{n}\n", "output": f"{n * n}\n"} for n in (1, 3, 4, 5)]
    res = run_tests(prog, tests, timeout_s=2.0)
    assert (res.passed, res.num_passed, res.num_tests) == (False, 1, 4)
    fb = res.feedback
    assert fb.startswith("1/4 tests passed.")
    assert "Test 2: Wrong Answer\nInput:\n3\nExpected output:\n9\nYour output:\n6" in fb
    assert "Test 3: Wrong Answer\nInput:\n4\nExpected output:\n16\nYour output:\n8" in fb
    assert "Test 4" not in fb  # at most 2 failing tests are shown
    assert [r.status for r in res.results] == ["passed", "wrong_answer", "wrong_answer", "wrong_answer"]


def test_runtime_error_feedback_has_the_program_traceback_only():
    res = _one("x = int(input())\nprint(10 // x)\n", expected="1\n", stdin="0\n")
    assert not res.passed and res.results[0].status == "runtime_error"
    assert "Test 1: Runtime Error" in res.feedback
    assert (
        'File "solution.py", line 2' in res.feedback
        and "ZeroDivisionError: integer division or modulo by zero" in res.feedback
    )
    assert "<string>" not in res.feedback and "sandbox" not in res.feedback  # no wrapper frames


def test_compile_error_fails_without_running():
    t0 = time.monotonic()
    res = run_tests("def f(:\n    pass\n", [{"input": "", "output": "x"}] * 3, timeout_s=2.0)
    assert (res.passed, res.num_passed, res.num_tests, res.results) == (False, 0, 3, ())
    assert res.feedback.startswith("Compilation Error:") and "SyntaxError" in res.feedback
    assert time.monotonic() - t0 < 1.0


def test_output_comparison_rule():
    assert normalize_output("1 2  \r\n3\t\n\n\n") == "1 2\n3"
    assert outputs_match("3\n", "3")
    assert outputs_match("a \nb\n\n", "a\nb")
    assert not outputs_match(" 3", "3")  # leading whitespace counts
    assert not outputs_match("a\n\nb", "a\nb")  # inner blank lines count
    assert not outputs_match("Yes", "yes")  # case counts
    res = run_tests("print('1 2   ')\nprint('3')\nprint()\n", [{"input": "", "output": "1 2\n3"}], timeout_s=2.0)
    assert res.passed


def test_stdin_large_input_and_lcb_json_tests():
    data = "\n".join(str(i) for i in range(200_000)) + "\n"
    prog = "import sys\nxs = sys.stdin.read().split()\nprint(len(xs), sum(map(int, xs)))\n"
    tests = '[{"input": ' + repr(data).replace("'", '"') + ', "output": "200000 19999900000", "testtype": "stdin"}]'
    res = run_tests(prog, tests, timeout_s=4.0)
    assert res.passed, res.feedback


def test_feedback_is_capped_at_2000_chars():
    big = "x" * 50_000
    res = run_tests("print('y' * 50000)\n", [{"input": big, "output": big}] * 2, timeout_s=2.0)
    assert not res.passed and len(res.feedback) <= 2000
    assert "Wrong Answer" in res.feedback and "truncated" in res.feedback


def test_extract_code():
    assert extract_code("Here:\n```python\nprint(1)\n```\nand\n```py\nprint(2)\n```") == "print(2)\n"
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("```python\nprint(4)\nprint(5") == "print(4)\nprint(5"  # cut off mid-block
    assert extract_code("print(6)") is None


@pytest.mark.parametrize(
    "tests, exc, match",
    [
        ([], ValueError, "tests is empty"),
        ([{"input": "1"}], ValueError, r"tests\[0\] is missing 'output'"),
        ([{"input": 1, "output": "1"}], TypeError, r"tests\[0\]\['input'\] must be a str; got int"),
        ([{"input": "", "output": "", "testtype": "functional"}], ValueError, "only stdin/stdout"),
        ("not json", ValueError, "not valid JSON"),
        (42, TypeError, "tests must be a list"),
    ],
)
def test_bad_tests_raise(tests, exc, match):
    with pytest.raises(exc, match=match):
        run_tests("print(1)", tests)


def test_bad_program_and_config_raise():
    with pytest.raises(TypeError, match="program must be a str; got bytes"):
        run_tests(b"print(1)", [{"input": "", "output": "1"}])
    with pytest.raises(ValueError, match="timeout_s must be a number in"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb must be an int >= 16; got 1.5"):
        SandboxConfig(memory_mb=1.5)
    with pytest.raises(ValueError, match="non-root uid"):
        SandboxConfig(uid=0)


# --------------------------------------------------------------------------------------------------------------
# hostile programs


def test_infinite_loop_times_out_and_skips_the_rest(host_unharmed):
    t0 = time.monotonic()
    res = run_tests("while True:\n    pass\n", [{"input": "", "output": "1"}] * 3, timeout_s=1.0, config=FAST)
    elapsed = time.monotonic() - t0
    assert [r.status for r in res.results] == ["timeout", "not_run", "not_run"]
    assert (
        res.num_passed == 0 and "Time Limit Exceeded" in res.feedback and "2 not run after a time-out" in res.feedback
    )
    assert 1.0 <= elapsed < 4.0


def test_fork_bomb_is_contained(host_unharmed):
    # Forks until the kernel refuses, children sleep; the parent reports how far it got and exits.
    src = """
    import os, time
    n = 0
    while n < 500:
        try:
            pid = os.fork()
        except OSError as e:
            print("fork refused:", e.strerror)
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
    print(n)
    """
    res = _one(src, expected="500\n")
    assert not res.passed and res.results[0].status == "wrong_answer"
    lines = res.results[0].actual.split("\n")
    assert lines[0] == "fork refused: Resource temporarily unavailable"
    assert int(lines[1]) < FAST.max_procs
    assert "Your output:\nfork refused" in res.feedback


def test_spinning_fork_bomb_is_killed(host_unharmed):
    res = _one("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    assert res.results[0].status == "timeout" and "Time Limit Exceeded" in res.feedback


@pytest.mark.parametrize(
    "src", ["x = bytearray(8 << 30)\n", "keep = []\nwhile True:\n    keep.append(bytearray(1 << 24))\n"]
)
def test_memory_hog_hits_the_limit(src, host_unharmed):
    res = _one(src)
    assert res.results[0].status == "runtime_error"
    assert "MemoryError" in res.feedback and "memory limit: 512 MiB" in res.feedback


def test_huge_output_is_capped(host_unharmed):
    cfg = SandboxConfig(timeout_s=2.0, max_output_bytes=1 << 16)
    run = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 4096)\n", config=cfg)
    assert run.output_limit and not run.ok and len(run.stdout) == 1 << 16
    res = _one("while True:\n    print('spam' * 1000)\n", config=cfg)
    assert res.results[0].status == "output_limit" and "Output Limit Exceeded" in res.feedback
    assert len(res.feedback) <= 2000


def test_writing_outside_its_dir_is_denied(tmp_path, host_unharmed, layers):
    if "uid" not in layers:
        pytest.skip("not root: the program runs as the caller and may write where the caller may")
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    repo_file = os.path.join(os.path.dirname(__file__), "sandbox_escape_marker.txt")
    for target in (str(victim), str(tmp_path / "new.txt"), repo_file):
        res = _one(f"open({target!r}, 'w').write('pwned')\nprint('ok')\n")
        assert res.results[0].status == "runtime_error", target
        # PermissionError (another uid's file), or FileNotFoundError where /tmp is the private tmpfs.
        assert "PermissionError" in res.feedback or "FileNotFoundError" in res.feedback
    assert victim.read_text() == "original"
    assert not (tmp_path / "new.txt").exists() and not os.path.exists(repo_file)


def test_private_tmp_and_cwd(host_unharmed, layers):
    if "mountns" not in layers:
        pytest.skip("no mount namespace on this machine")
    marker = f"credit-escape-{os.getpid()}"
    src = f"""
    import os
    open('/tmp/{marker}', 'w').write('x')
    open('/dev/shm/{marker}', 'w').write('x')
    open('here.txt', 'w').write('x')
    print(os.getcwd(), sorted(os.listdir('.')), os.environ['HOME'] == os.getcwd())
    """
    run = run_python(_prog(src), config=FAST)
    assert run.ok, run.stderr
    assert run.stdout.split("\n")[0] == "/tmp/sandbox ['here.txt', 'solution.py'] True"
    assert not os.path.exists(f"/tmp/{marker}") and not os.path.exists(f"/dev/shm/{marker}")


def test_socket_is_blocked(host_unharmed):
    res = _one("import socket\ns = socket.create_connection(('1.1.1.1', 80), timeout=1)\nprint('ok')\n")
    assert res.results[0].status == "runtime_error"
    assert "PermissionError: network access is disabled in this sandbox" in res.feedback


def test_raw_socket_via_ctypes_reaches_nothing(host_unharmed, layers):
    # ctypes bypasses the audit hook; the empty network namespace must still stop it.
    if "netns" not in layers:
        pytest.skip("no network namespace on this machine")
    src = """
    import ctypes, socket, struct
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
    addr = struct.pack('<HH4s8x', socket.AF_INET, socket.htons(53), bytes([8, 8, 8, 8]))
    rc = libc.connect(fd, addr, len(addr))
    print('connected' if rc == 0 else 'refused', ctypes.get_errno())
    """
    run = run_python(_prog(src), config=FAST)
    assert run.ok and run.stdout.startswith("refused"), run.stdout + run.stderr


def test_parent_environment_is_not_visible(monkeypatch, host_unharmed):
    secret = "sk-credit-test-5f1d2c"
    monkeypatch.setenv("CREDIT_FAKE_SECRET", secret)
    run = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('CREDIT_FAKE_SECRET'))\n", config=FAST)
    assert run.ok and secret not in run.stdout
    assert run.stdout.split("\n")[1] == "None"
    assert "CREDIT_FAKE_SECRET" not in run.stdout
    # Through /proc: the parent's environ belongs to another uid (or another PID namespace).
    res = _one(f"print(open('/proc/{os.getpid()}/environ').read())\n")
    assert res.results[0].status == "runtime_error" and secret not in res.feedback
    assert "PermissionError" in res.feedback or "FileNotFoundError" in res.feedback
    res = _one("import os\nprint(os.environ['CREDIT_FAKE_SECRET'])\n")
    assert res.results[0].status == "runtime_error" and "KeyError: 'CREDIT_FAKE_SECRET'" in res.feedback


def test_escaped_daemon_is_killed(tmp_path, host_unharmed):
    # A child that leaves the process group (setsid) and outlives the program must still die with the run.
    src = """
    import os, time
    if os.fork() == 0:
        os.setsid()
        time.sleep(60)
        os._exit(0)
    print('ok')
    """
    res = _one(src)
    assert res.passed


@pytest.mark.skipif(not IS_ROOT, reason="the uid layer needs root")
def test_without_namespaces_uid_and_limits_still_contain(tmp_path, host_unharmed):
    """Docker without CAP_SYS_ADMIN: no namespaces, but the uid switch, rlimits and audit hook hold."""
    run = run_python("print('ok')", config=NO_NS)
    assert run.ok and "pidns" not in run.layers and "uid" in run.layers
    res = _one("import socket\nsocket.socket()\n", config=NO_NS)
    assert "network access is disabled" in res.feedback
    res = _one(f"open({str(tmp_path / 'x')!r}, 'w')\n", config=NO_NS)
    assert "PermissionError" in res.feedback and not (tmp_path / "x").exists()
    res = _one("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('ok')\n", config=NO_NS)
    assert res.passed  # the setsid() child is killed by uid afterwards (checked by host_unharmed)
    bomb = """
    import os, time
    n = 0
    while n < 100:
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(60)
        n += 1
    print(n)
    """
    res = _one(bomb, expected="100", config=NO_NS)
    assert int(res.results[0].actual.split()[-1]) < NO_NS.max_procs


def test_sandbox_report_on_root_has_every_layer(layers):
    if not IS_ROOT:
        pytest.skip("namespaces and the uid switch need root here")
    assert {"rlimits", "uid", "audit", "env"} <= layers
    # Namespaces are expected on this project's machines (root with CAP_SYS_ADMIN); elsewhere they may be off.
    if os.environ.get("CREDIT_REQUIRE_NAMESPACES") == "1":
        assert {"mountns", "netns", "pidns"} <= layers


def test_concurrent_runs_are_independent(host_unharmed):
    # The trainer may score rollouts from a thread pool: each run has its own uid, dir and limits.
    from concurrent.futures import ThreadPoolExecutor

    def job(i: int):
        return run_python(
            f"import os\nopen('f', 'w').write('{i}')\nprint(open('f').read(), input())", f"in{i}", config=FAST
        )

    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(job, range(8)))
    assert [r.stdout for r in runs] == [f"{i} in{i}\n" for i in range(8)]
