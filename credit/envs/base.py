"""The environment interface shared by every task (code, mcq, tool, synthetic).

An environment turns a data record (a plain JSON-able dict with at least ``"prompt"``) into the user message
the policy sees, and scores a sampled response:

    env = get_task("largest")
    text = env.make_prompt(record)              # user message; the trainer applies the chat template
    outcome = env.score(record, response_text)  # Outcome(reward, success, feedback)

``feedback`` is the environment's text for the teacher context of CREDIT / SDPO (docs/method.md, "Feedback and teacher contexts":
failing tests, tool-call mismatch); it is None when there is nothing to say (a success). ``check_record``
validates and normalises one record; `credit.envs.data.load_jsonl` calls it for every line of a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

__all__ = ["FEEDBACK_LIMIT", "Environment", "Outcome", "clip", "require_str"]

# SDPO keeps environment feedback short; the teacher context grows by this much at most.
FEEDBACK_LIMIT = 2000


class Outcome(NamedTuple):
    """The score of one response.

    Attributes:
        reward: scalar outcome reward (1.0 = solved; some tasks give partial credit in [0, 1)).
        success: the response solved the task (counts for accuracy and makes it a sibling "solution").
        feedback: text feedback for the teacher context, or None.
    """

    reward: float
    success: bool
    feedback: str | None = None


@runtime_checkable
class Environment(Protocol):
    """What the trainer needs from a task. Records are dicts; responses are decoded text."""

    name: str

    def make_prompt(self, record: Mapping[str, Any]) -> str:
        """The user message for `record` (no chat template applied)."""
        ...

    def score(self, record: Mapping[str, Any], response: str) -> Outcome:
        """Reward, success flag and feedback for one response to `record`."""
        ...

    def check_record(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Validate one record and return it normalised; raise ValueError naming the bad field."""
        ...


def require_str(record: Mapping[str, Any], key: str, *, nonempty: bool = True) -> str:
    """record[key] as a str; ValueError naming the field if it is missing, not a str, or blank."""
    if key not in record:
        raise ValueError(f"missing field {key!r} (fields present: {sorted(record)})")
    v = record[key]
    if not isinstance(v, str):
        raise ValueError(f"field {key!r} must be a string; got {type(v).__name__}")
    if nonempty and not v.strip():
        raise ValueError(f"field {key!r} is empty")
    return v


def clip(text: str, limit: int) -> str:
    """Shorten `text` to at most `limit` chars, keeping head and tail (errors are at the end of tracebacks)."""
    if len(text) <= limit:
        return text
    marker = "\n...[truncated]...\n"
    if limit <= len(marker) + 2:
        return text[:limit]
    head = (limit - len(marker)) // 2
    tail = limit - len(marker) - head
    return text[:head] + marker + text[len(text) - tail :]
