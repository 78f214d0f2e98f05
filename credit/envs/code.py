"""Code environment: run a Python program against stdin/stdout tests (LiveCodeBench style) in the sandbox.

`run_tests(program, tests)` runs the program once per test in `credit.envs.sandbox` (time, memory, process
and file-size limits, no network, private temp dir, scrubbed env) and compares its stdout with the expected
output. Comparison rule (`outputs_match`): ``\\r\\n`` becomes ``\\n``, trailing whitespace is stripped from every
line and trailing newlines from the end; everything else (leading spaces, blank lines between lines, case)
must match exactly. Call-based ("functional", LeetCode-style) tests are not supported: stdin tests only.

Feedback follows SDPO's code feedback: the compile or runtime error, or input / expected / actual output of
up to 2 failing tests, at most `FEEDBACK_LIMIT` (2000) characters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from credit.envs.base import FEEDBACK_LIMIT, Outcome, clip, require_str
from credit.envs.sandbox import SandboxConfig, run_python

__all__ = ["CodeEnv", "CodeResult", "TestResult", "extract_code", "normalize_output", "outputs_match", "run_tests"]

Status = Literal["passed", "wrong_answer", "runtime_error", "timeout", "output_limit", "not_run"]

# Per-field share of the feedback budget: two failing tests x (input, expected, actual) must fit in 2000.
_FIELD_LIMIT = 280
_ERROR_LIMIT = 700
# Model output is bounded by max_new_tokens; a larger "program" is not worth compiling.
_MAX_PROGRAM_CHARS = 1 << 20


@dataclass(frozen=True)
class TestResult:
    """One test's outcome. `status` is one of passed / wrong_answer / runtime_error / timeout / output_limit /
    not_run (skipped after an earlier timeout, see `run_tests`)."""

    __test__ = False  # not a pytest test class, despite the name

    status: Status
    input: str
    expected: str
    actual: str = ""
    error: str = ""
    wall_s: float = 0.0


@dataclass(frozen=True)
class CodeResult:
    """What `run_tests` found.

    Attributes:
        passed: every test passed.
        num_passed, num_tests: counts (num_tests = len(tests)).
        feedback: SDPO-style text: compile/runtime error, or input/expected/actual of up to 2 failing tests;
            "All N tests passed." on success. At most 2000 characters.
        results: per-test `TestResult`s, in test order (empty on a compile error).
    """

    passed: bool
    num_passed: int
    num_tests: int
    feedback: str
    results: tuple[TestResult, ...] = ()


def normalize_output(text: str) -> str:
    """The comparison form of a program output: CRLF -> LF, trailing whitespace off every line, trailing
    newlines off the end."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).rstrip("\n")


def outputs_match(actual: str, expected: str) -> bool:
    """True when `actual` equals `expected` after `normalize_output` on both."""
    return normalize_output(actual) == normalize_output(expected)


def _check_tests(tests: Any, where: str = "run_tests") -> list[dict[str, str]]:
    if isinstance(tests, str):  # LiveCodeBench stores test lists as JSON strings
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: tests is a string but not valid JSON ({exc})") from None
    if not isinstance(tests, Sequence) or isinstance(tests, (str, bytes)):
        raise TypeError(f"{where}: tests must be a list of {{'input': str, 'output': str}}; got {type(tests).__name__}")
    if len(tests) == 0:
        raise ValueError(f"{where}: tests is empty; need at least one {{'input': ..., 'output': ...}}")
    out = []
    for i, t in enumerate(tests):
        if not isinstance(t, Mapping):
            raise TypeError(f"{where}: tests[{i}] must be a dict with 'input' and 'output'; got {type(t).__name__}")
        if t.get("testtype", "stdin") != "stdin":
            raise ValueError(
                f"{where}: tests[{i}] has testtype {t['testtype']!r}; only stdin/stdout tests are supported"
            )
        for key in ("input", "output"):
            if key not in t:
                raise ValueError(f"{where}: tests[{i}] is missing {key!r} (keys: {sorted(t)})")
            if not isinstance(t[key], str):
                raise TypeError(f"{where}: tests[{i}][{key!r}] must be a str; got {type(t[key]).__name__}")
        out.append({"input": t["input"], "output": t["output"]})
    return out


def _compile_error(program: str) -> str | None:
    """The compile error text as Python would print it, or None. compile() never runs the code."""
    import traceback

    if len(program) > _MAX_PROGRAM_CHARS:
        return f"Program too long: {len(program)} characters (limit {_MAX_PROGRAM_CHARS})."
    try:
        compile(program, "solution.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:  # ValueError: "source code string cannot contain null bytes"
        return "".join(traceback.format_exception_only(type(exc), exc)).rstrip()
    except (RecursionError, MemoryError) as exc:  # absurdly nested expressions
        return f"{type(exc).__name__}: the program is too deeply nested to compile"
    return None


def _classify(run, test: Mapping[str, str], config: SandboxConfig) -> TestResult:
    common = {"input": test["input"], "expected": test["output"], "actual": run.stdout, "wall_s": run.wall_s}
    if run.timed_out:
        return TestResult("timeout", error=f"Time limit exceeded ({config.timeout_s:g} s).", **common)
    if run.output_limit:
        return TestResult("output_limit", error=f"Output limit exceeded ({config.max_output_bytes} bytes).", **common)
    if run.signal is not None:
        import signal as _signal

        try:
            name = _signal.Signals(run.signal).name
        except ValueError:
            name = str(run.signal)
        hint = {"SIGXCPU": " (CPU time limit)", "SIGSEGV": " (a crash, e.g. stack overflow)"}.get(name, "")
        return TestResult("runtime_error", error=f"Killed by signal {name}{hint}.\n{run.stderr}".rstrip(), **common)
    if run.returncode != 0:
        err = run.stderr.rstrip() or f"Exit code {run.returncode}."
        if "MemoryError" in err:
            err += f"\n(memory limit: {config.memory_mb} MiB)"
        return TestResult("runtime_error", error=err, **common)
    status: Status = "passed" if outputs_match(run.stdout, test["output"]) else "wrong_answer"
    return TestResult(status, **common)


_TITLES = {
    "wrong_answer": "Wrong Answer",
    "runtime_error": "Runtime Error",
    "timeout": "Time Limit Exceeded",
    "output_limit": "Output Limit Exceeded",
}


def _describe(index: int, r: TestResult) -> str:
    parts = [f"Test {index + 1}: {_TITLES[r.status]}", "Input:", clip(r.input.rstrip("\n"), _FIELD_LIMIT)]
    parts += ["Expected output:", clip(normalize_output(r.expected), _FIELD_LIMIT)]
    if r.status == "runtime_error":
        parts += ["Error:", clip(r.error, _ERROR_LIMIT)]
    elif r.status == "wrong_answer":
        shown = normalize_output(r.actual)
        parts += ["Your output:", clip(shown, _FIELD_LIMIT) if shown else "(nothing)"]
    else:
        parts += [r.error]
    return "\n".join(parts)


def _feedback(results: Sequence[TestResult]) -> str:
    n = len(results)
    failed = [(i, r) for i, r in enumerate(results) if r.status not in ("passed", "not_run")]
    num_passed = sum(r.status == "passed" for r in results)
    if not failed:
        return f"All {n} tests passed."
    head = f"{num_passed}/{n} tests passed."
    skipped = sum(r.status == "not_run" for r in results)
    if skipped:
        head += f" {skipped} not run after a time-out."
    body = "\n\n".join(_describe(i, r) for i, r in failed[:2])
    return clip(head + "\n\n" + body, FEEDBACK_LIMIT)


def run_tests(
    program: str,
    tests: Sequence[Mapping[str, str]] | str,
    *,
    timeout_s: float = 4.0,
    config: SandboxConfig | None = None,
    stop_on_timeout: bool = True,
) -> CodeResult:
    """Run `program` once per test in the sandbox and compare stdout with each expected output.

    Args:
        program: Python source that reads stdin and writes stdout.
        tests: ``[{"input": str, "output": str}, ...]`` (LiveCodeBench's stdin tests), or that list as a JSON
            string. A ``"testtype"`` other than ``"stdin"`` is rejected.
        timeout_s: wall-clock limit per test, seconds (replaces ``config.timeout_s``).
        config: other sandbox limits (memory, processes, output size); None = `SandboxConfig` defaults.
        stop_on_timeout: after a test times out, mark the remaining tests ``not_run`` (failed) instead of
            running them: a program that hangs on one input usually hangs on the rest, each costing timeout_s.

    Returns:
        `CodeResult` with ``passed``, ``num_passed``, ``num_tests``, ``feedback`` (<= 2000 chars) and the
        per-test results. A program that does not compile fails every test without running.

    Raises:
        TypeError / ValueError: malformed `program` or `tests` (never for the program's own behaviour).
    """
    if not isinstance(program, str):
        raise TypeError(f"run_tests: program must be a str; got {type(program).__name__}")
    cases = _check_tests(tests)
    config = replace(config or SandboxConfig(), timeout_s=timeout_s)
    err = _compile_error(program)
    if err is not None:
        return CodeResult(False, 0, len(cases), clip(f"Compilation Error:\n{err}", FEEDBACK_LIMIT))
    results: list[TestResult] = []
    for t in cases:
        if stop_on_timeout and results and results[-1].status in ("timeout", "not_run"):
            results.append(TestResult("not_run", input=t["input"], expected=t["output"]))
            continue
        results.append(_classify(run_python(program, t["input"], config=config), t, config))
    num_passed = sum(r.status == "passed" for r in results)
    return CodeResult(num_passed == len(cases), num_passed, len(cases), _feedback(results), tuple(results))


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> str | None:
    """The last fenced code block of a response (```python, ```py or bare ```); a block left open at the end
    (generation cut off) runs to the end. None when the response has no fence."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else None


class CodeEnv:
    """Competitive-programming problems with stdin/stdout tests.

    Record: ``{"prompt": problem statement, "tests": [{"input": str, "output": str}, ...]}``; ``tests`` may
    be a JSON string (LiveCodeBench's ``public_test_cases``). The response's last fenced code block is run.
    Reward 1.0 when every test passes, else 0.0 (``partial_credit=True``: the fraction passed).
    """

    name = "code"

    def __init__(self, *, timeout_s: float = 4.0, partial_credit: bool = False, config: SandboxConfig | None = None):
        self.timeout_s = timeout_s
        self.partial_credit = partial_credit
        self.config = config

    def check_record(self, record: Mapping[str, Any]) -> dict[str, Any]:
        require_str(record, "prompt")
        if "tests" not in record:
            raise ValueError(f"missing field 'tests' (fields present: {sorted(record)})")
        return {**record, "tests": _check_tests(record["tests"], where="field 'tests'")}

    def make_prompt(self, record: Mapping[str, Any]) -> str:
        return (
            f"{record['prompt'].strip()}\n\n"
            "Write a Python 3 program that reads the input from standard input and prints the answer to standard "
            "output. Put the complete program in one ```python code block."
        )

    def score(self, record: Mapping[str, Any], response: str) -> Outcome:
        program = extract_code(response)
        if program is None:
            return Outcome(0.0, False, "No ```python code block was found in the response; nothing was run.")
        res = run_tests(program, record["tests"], timeout_s=self.timeout_s, config=self.config)
        reward = res.num_passed / res.num_tests if self.partial_credit else float(res.passed)
        return Outcome(reward, res.passed, None if res.passed else res.feedback)
