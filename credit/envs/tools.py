"""Tool-call environment (ToolAlpaca-style): the response's action name and JSON arguments must match.

Two response formats are parsed (the first tool call in the response counts):

1. ``<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>`` (Qwen / Hermes style;
   ``arguments`` may also be a JSON string holding an object).
2. ToolAlpaca's ReAct lines ``Action: get_weather`` then ``Action Input: {"city": "Paris"}`` (the input is the
   first JSON object after ``Action Input:``; an empty input means ``{}``).

Matching rule: the name must be equal exactly; the arguments must have the same keys, and values are equal
when they are the same JSON value after strings are whitespace-collapsed and case-folded (``"New  York"`` ==
``"new york"``), numbers compare by value (``1 == 1.0``, but booleans are not numbers), and lists / objects
compare element by element. Feedback names what differed: the action, missing or unexpected arguments, or
each differing value with the expected one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from credit.envs.base import FEEDBACK_LIMIT, Outcome, clip, require_str

__all__ = ["ToolCall", "ToolEnv", "compare_calls", "parse_tool_call"]

_TAGGED = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL | re.IGNORECASE)
_ACTION = re.compile(r"^[ \t]*Action[ \t]*:[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_ACTION_INPUT = re.compile(r"^[ \t]*Action[ \t]+Input[ \t]*:", re.MULTILINE)


class ToolCall(NamedTuple):
    """A parsed action: its name and its JSON-object arguments."""

    name: str
    arguments: dict[str, Any]


def _as_object(value: Any, what: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what} is not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object; got {type(value).__name__}")
    return value


def parse_tool_call(response: str) -> tuple[ToolCall | None, str | None]:
    """Parse the first tool call of a response.

    Returns:
        ``(call, None)`` on success, ``(None, reason)`` when no call is found or it is malformed; `reason` is
        feedback text.
    """
    m = _TAGGED.search(response)
    if m is not None:
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError as exc:
            return None, f"The <tool_call> content is not valid JSON ({exc.msg})."
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"].strip():
            return None, 'The <tool_call> JSON must be an object with a "name" string and an "arguments" object.'
        try:
            args = _as_object(obj.get("arguments", {}), '"arguments"')
        except ValueError as exc:
            return None, f"The <tool_call> {exc}."
        return ToolCall(obj["name"].strip(), args), None
    a = _ACTION.search(response)
    if a is not None:
        name = a.group(1).strip().strip("`'\"")
        if not name:
            return None, "The Action line names no tool."
        rest = response[a.end() :]
        b = _ACTION_INPUT.search(rest)
        if b is None:
            return None, f"Action {name} has no 'Action Input:' line with its JSON arguments."
        after = rest[b.end() :]
        text = after.lstrip()
        if not text.startswith("{"):
            # ToolAlpaca writes "Action Input: {}" for no arguments; an empty input is read the same way.
            if after.split("\n", 1)[0].strip() == "":
                return ToolCall(name, {}), None
            return None, f"The Action Input of {name} must be a JSON object."
        try:
            obj, _ = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError as exc:
            return None, f"The Action Input of {name} is not valid JSON ({exc.msg})."
        if not isinstance(obj, dict):
            return None, f"The Action Input of {name} must be a JSON object."
        return ToolCall(name, obj), None
    return None, 'No tool call found: write <tool_call>{"name": ..., "arguments": {...}}</tool_call>.'


def _norm(v: Any) -> Any:
    if isinstance(v, str):
        return ("s", " ".join(v.split()).casefold())
    if isinstance(v, bool) or v is None:
        return ("c", v)
    if isinstance(v, (int, float)):
        return ("n", float(v))
    if isinstance(v, list):
        return ("l", tuple(_norm(x) for x in v))
    if isinstance(v, dict):
        return ("d", tuple(sorted((k, _norm(x)) for k, x in v.items())))
    return ("o", repr(v))


def _show(v: Any) -> str:
    return clip(json.dumps(v, ensure_ascii=False), 200)


def compare_calls(got: ToolCall, expected: ToolCall, *, reveal_expected: bool = True) -> list[str]:
    """The differences between two calls as feedback sentences (empty list: they match)."""
    if got.name != expected.name:
        msg = f"Called the action {got.name!r}, but the expected action is {expected.name!r}."
        if got.name.casefold() == expected.name.casefold():
            msg += " (Action names are case-sensitive.)"
        if not reveal_expected:
            msg = f"Called the action {got.name!r}, which is not the right action."
        return [msg]
    diffs = []
    missing = [k for k in expected.arguments if k not in got.arguments]
    extra = [k for k in got.arguments if k not in expected.arguments]
    if missing:
        diffs.append("Missing argument(s): " + ", ".join(missing) + ".")
    if extra:
        diffs.append("Unexpected argument(s): " + ", ".join(extra) + ".")
    for k, want in expected.arguments.items():
        if k in got.arguments and _norm(got.arguments[k]) != _norm(want):
            d = f"Argument {k!r} is {_show(got.arguments[k])}"
            diffs.append(d + (f", expected {_show(want)}." if reveal_expected else ", which is wrong."))
    return diffs


class ToolEnv:
    """Single tool call per prompt.

    Record: ``{"prompt": user request, "expected": {"name": str, "arguments": {...}}, "tools": [...]}``;
    ``tools`` (optional) is a list of ``{"name", "description", "parameters"}`` objects shown in the prompt.
    Reward 1.0 when name and arguments match (see module docstring), else 0.0.

    Args:
        reveal_expected: say the expected action / argument values in the feedback (test-style, default).
    """

    name = "tool"

    def __init__(self, *, reveal_expected: bool = True):
        self.reveal_expected = reveal_expected

    def check_record(self, record: Mapping[str, Any]) -> dict[str, Any]:
        require_str(record, "prompt")
        if "expected" not in record:
            raise ValueError(f"missing field 'expected' (fields present: {sorted(record)})")
        exp = record["expected"]
        if not isinstance(exp, Mapping) or not isinstance(exp.get("name"), str) or not exp["name"].strip():
            raise ValueError('field \'expected\' must be {"name": str, "arguments": {...}}; got ' + f"{exp!r:.120}")
        args = _as_object(exp.get("arguments", {}), "field 'expected.arguments'")
        out = {**record, "expected": {"name": exp["name"].strip(), "arguments": args}}
        tools = record.get("tools")
        if tools is not None:
            if not isinstance(tools, list) or not all(
                isinstance(t, Mapping) and isinstance(t.get("name"), str) for t in tools
            ):
                raise ValueError("field 'tools' must be a list of objects with a 'name' string")
        return out

    def make_prompt(self, record: Mapping[str, Any]) -> str:
        parts = [record["prompt"].strip()]
        tools = record.get("tools")
        if tools:
            lines = ["Available tools:"]
            for t in tools:
                line = f"- {t['name']}: {t.get('description', '').strip()}"
                if t.get("parameters"):
                    line += f" Parameters: {json.dumps(t['parameters'], ensure_ascii=False)}"
                lines.append(line)
            parts.append("\n".join(lines))
        parts.append(
            'Call exactly one tool. Reply with <tool_call>{"name": "<tool name>", "arguments": {<JSON arguments>}}'
            "</tool_call>."
        )
        return "\n\n".join(parts)

    def score(self, record: Mapping[str, Any], response: str) -> Outcome:
        call, reason = parse_tool_call(response)
        if call is None:
            return Outcome(0.0, False, reason)
        exp = record["expected"]
        diffs = compare_calls(call, ToolCall(exp["name"], dict(exp["arguments"])), reveal_expected=self.reveal_expected)
        if not diffs:
            return Outcome(1.0, True, None)
        return Outcome(0.0, False, clip("The tool call is wrong. " + " ".join(diffs), FEEDBACK_LIMIT))
