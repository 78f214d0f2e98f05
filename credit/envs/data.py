"""Load task records from JSONL files (one JSON object per line), so users bring real benchmarks.

Each line is one record with a non-empty ``"prompt"`` plus the task's fields:

=========  ==========================================================================================
task       fields
=========  ==========================================================================================
code       ``"tests": [{"input": str, "output": str}, ...]`` (or that list as a JSON string, as in
           LiveCodeBench's ``public_test_cases``); stdin/stdout tests only
mcq        ``"answer": str``, optional ``"choices": [str, ...]`` (then ``answer`` is a letter A, B, ...)
tool       ``"expected": {"name": str, "arguments": {...}}``, optional ``"tools": [{"name", ...}, ...]``
=========  ==========================================================================================

Blank lines are skipped. Any other problem (a line that is not JSON, not an object, a missing or empty field)
raises ValueError naming the file and the 1-based line number; nothing is returned half-loaded. Fields a
task does not use are kept, so records can carry ids and metadata through training.
"""

from __future__ import annotations

import json
import os
from typing import Any

from credit.envs.base import Environment

__all__ = ["load_jsonl"]


def load_jsonl(path: str | os.PathLike, task: str | Environment) -> list[dict[str, Any]]:
    """Read and validate every record of a JSONL file for `task`.

    Args:
        path: the JSONL file.
        task: a task name (``"code"``, ``"mcq"``, ``"tool"``, or a synthetic task) or an `Environment`; its
            ``check_record`` validates and normalises each record.

    Returns:
        list of record dicts, in file order (at least one).

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``"<path>:<line>: <problem>"`` for the first bad line, or an empty file.
    """
    from credit.envs import get_task  # late import: credit.envs imports this module

    env = get_task(task) if isinstance(task, str) else task
    if not hasattr(env, "check_record"):
        raise TypeError(f"load_jsonl: task must be a task name or an Environment; got {type(task).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_jsonl: no such data file: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object; got {type(obj).__name__}")
            try:
                records.append(env.check_record(obj))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
    if not records:
        raise ValueError(f"{path}: no records (the file is empty)")
    return records
