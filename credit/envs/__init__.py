"""Environments: score a response and give the text feedback that CREDIT's teacher reads.

``get_task(name, **options)`` builds one: ``code`` (sandboxed stdin/stdout tests), ``mcq`` (answer tag),
``mcq_plain`` (multiple choice read from a bare reply, for small models),
``tool`` (action + JSON arguments), and the synthetic tasks ``largest``, ``first_letter`` and
``largest_shortcut`` (seeded splits, see `credit.envs.synthetic`). Data-backed tasks load records with
``load_jsonl(path, name)``; synthetic ones make them with ``get_task(name).splits(seed=...)``.
"""

from __future__ import annotations

from typing import Any

from credit.envs.base import Environment, Outcome
from credit.envs.code import CodeEnv, CodeResult, run_tests
from credit.envs.data import load_jsonl
from credit.envs.mcq import MCQEnv, MCQPlainEnv
from credit.envs.synthetic import SYNTHETIC_TASKS, Split, SyntheticTask
from credit.envs.tools import ToolEnv

__all__ = [
    "TASKS",
    "CodeEnv",
    "CodeResult",
    "Environment",
    "MCQEnv",
    "MCQPlainEnv",
    "Outcome",
    "Split",
    "SyntheticTask",
    "ToolEnv",
    "get_task",
    "load_jsonl",
    "run_tests",
]

_DATA_TASKS: dict[str, type] = {"code": CodeEnv, "mcq": MCQEnv, "mcq_plain": MCQPlainEnv, "tool": ToolEnv}
TASKS: tuple[str, ...] = tuple(_DATA_TASKS) + tuple(SYNTHETIC_TASKS)


def get_task(name: str, **options: Any) -> Environment:
    """A fresh environment for task `name`; `options` go to its constructor (e.g. ``timeout_s=`` for code).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if not isinstance(name, str):
        raise TypeError(f"get_task: name must be a str; got {type(name).__name__}")
    cls = _DATA_TASKS.get(name) or SYNTHETIC_TASKS.get(name)
    if cls is None:
        raise ValueError(f"get_task: unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return cls(**options)
