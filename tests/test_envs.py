"""Environments: MCQ, tool-call and synthetic scoring on hand-written cases, the task registry, the JSONL loader
and its errors, and the code environment end to end (credit.envs)."""

from __future__ import annotations

import json
import os
import re

import pytest

from credit.envs import TASKS, Environment, Outcome, get_task, load_jsonl
from credit.envs.base import clip
from credit.envs.mcq import MCQEnv, normalize_answer
from credit.envs.synthetic import SHORTCUT_REWARD, FirstLetterTask, LargestShortcutTask, LargestTask
from credit.envs.tools import ToolCall, ToolEnv, parse_tool_call

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "data")


# --------------------------------------------------------------------------------------------------------------
# registry and base


@pytest.mark.parametrize("name", TASKS)
def test_every_task_is_an_environment(name):
    env = get_task(name)
    assert isinstance(env, Environment) and env.name == name


def test_get_task_errors_and_options():
    with pytest.raises(ValueError, match=r"unknown task 'chess'; known tasks: code, mcq, mcq_plain, tool, largest"):
        get_task("chess")
    with pytest.raises(TypeError, match="name must be a str; got int"):
        get_task(3)
    assert get_task("code", timeout_s=1.5).timeout_s == 1.5
    assert get_task("mcq", reveal_answer=True).reveal_answer is True


def test_clip_keeps_head_and_tail():
    text = "A" * 100 + "B" * 100
    out = clip(text, 60)
    assert len(out) == 60 and out.startswith("A") and out.endswith("B") and "truncated" in out
    assert clip("short", 60) == "short"


# --------------------------------------------------------------------------------------------------------------
# multiple choice

MCQ = {"prompt": "Which gas is most abundant in air?", "choices": ["Oxygen", "Nitrogen", "Argon"], "answer": "B"}


@pytest.mark.parametrize(
    "response, success",
    [
        ("Nitrogen is about 78%. <answer>B</answer>", True),
        ("<ANSWER> (b). </ANSWER>", True),  # tags and letter case-insensitive, brackets/period stripped
        ("I first thought <answer>A</answer> but no: <answer>B</answer>", True),  # the last tag counts
        ("<answer>B</answer> ... actually <answer>A</answer>", False),
        ("<answer>B) Nitrogen</answer>", False),  # exact match after normalisation, not "starts with"
        ("The answer is B.", False),  # no tag
    ],
)
def test_mcq_scoring(response, success):
    out = MCQEnv().score(MCQ, response)
    assert isinstance(out, Outcome) and out.success is success and out.reward == float(success)
    assert (out.feedback is None) is success


def test_mcq_feedback():
    env = MCQEnv()
    assert env.score(MCQ, "B").feedback == (
        "No <answer>...</answer> tag was found; the final answer must be written as <answer>X</answer>."
    )
    assert env.score(MCQ, "<answer> A </answer>").feedback == "The answer <answer>A</answer> is incorrect."
    assert MCQEnv(reveal_answer=True).score(MCQ, "<answer>A</answer>").feedback.endswith("The correct answer is B.")


def test_mcq_free_form_and_prompt():
    rec = {"prompt": "How many protons does carbon have?", "answer": "6"}
    assert MCQEnv().score(rec, "<answer>6</answer>").success
    assert not MCQEnv().score(rec, "<answer>12</answer>").success
    assert normalize_answer("  New   York. ") == normalize_answer("new york")
    prompt = MCQEnv().make_prompt(MCQ)
    assert "A. Oxygen\nB. Nitrogen\nC. Argon" in prompt and "<answer>A</answer>" in prompt


def test_mcq_check_record():
    env = MCQEnv()
    with pytest.raises(ValueError, match=r"answer' must be one of the choice letters \['A', 'B', 'C'\]; got 'D'"):
        env.check_record({**MCQ, "answer": "D"})
    with pytest.raises(ValueError, match="choices' must be a list of 2..26 strings"):
        env.check_record({**MCQ, "choices": ["only one"]})
    assert env.check_record({**MCQ, "answer": "(b)"})["choices"] == MCQ["choices"]


# --------------------------------------------------------------------------------------------------------------
# tool calls

TOOL = {"prompt": "Weather in Paris?", "expected": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}


@pytest.mark.parametrize(
    "response",
    [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}</tool_call>',
        # arguments as a JSON string; case, spaces and 3 vs 3.0 do not matter
        "<tool_call>\n"
        + json.dumps({"name": "get_weather", "arguments": '{"city": "paris ", "days": 3.0}'})
        + "</tool_call>",
        'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "PARIS", "days": 3}\nObservation:',
        'Action: `get_weather`\nAction Input:\n{"days": 3, "city": "Paris"} and then I\'ll wait',
    ],
)
def test_tool_call_matches(response):
    out = ToolEnv().score(TOOL, response)
    assert out == Outcome(1.0, True, None)


@pytest.mark.parametrize(
    "response, feedback",
    [
        (
            '<tool_call>{"name": "get_forecast", "arguments": {"city": "Paris", "days": 3}}</tool_call>',
            "The tool call is wrong. Called the action 'get_forecast', but the expected action is 'get_weather'.",
        ),
        (
            '<tool_call>{"name": "Get_Weather", "arguments": {}}</tool_call>',
            "The tool call is wrong. Called the action 'Get_Weather', but the expected action is 'get_weather'. "
            "(Action names are case-sensitive.)",
        ),
        (
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "C"}}</tool_call>',
            "The tool call is wrong. Missing argument(s): days. Unexpected argument(s): unit. "
            'Argument \'city\' is "Lyon", expected "Paris".',
        ),
        (
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": true}}</tool_call>',
            "The tool call is wrong. Argument 'days' is true, expected 3.",  # booleans are not numbers
        ),
        (
            "<tool_call>{name: get_weather}</tool_call>",
            "The <tool_call> content is not valid JSON (Expecting property name enclosed in double quotes).",
        ),
        (
            'Action: get_weather\nAction Input: {"city": }',
            "The Action Input of get_weather is not valid JSON (Expecting value).",
        ),
        (
            "Action: get_weather\nThen nothing",
            "Action get_weather has no 'Action Input:' line with its JSON arguments.",
        ),
        (
            "I would call the weather API.",
            'No tool call found: write <tool_call>{"name": ..., "arguments": {...}}</tool_call>.',
        ),
    ],
)
def test_tool_call_mismatch_feedback(response, feedback):
    out = ToolEnv().score(TOOL, response)
    assert out.reward == 0.0 and not out.success
    assert out.feedback == feedback


def test_tool_parse_details():
    # The first call counts; an empty ToolAlpaca input means no arguments.
    call, err = parse_tool_call(
        '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b"}</tool_call>'
    )
    assert (call, err) == (ToolCall("a", {}), None)
    assert parse_tool_call("Action: list_files\nAction Input: \nObservation: ...") == (ToolCall("list_files", {}), None)
    assert parse_tool_call("Action: f\nAction Input: [1, 2]")[1] == "The Action Input of f must be a JSON object."
    hidden = ToolEnv(reveal_expected=False).score(
        TOOL, '<tool_call>{"name": "get_weather", "arguments": {"city": "Lyon", "days": 3}}</tool_call>'
    )
    assert "Paris" not in hidden.feedback and "'city'" in hidden.feedback


def test_tool_prompt_and_check_record():
    env = ToolEnv()
    rec = env.check_record(
        {**TOOL, "tools": [{"name": "get_weather", "description": "Weather.", "parameters": {"city": "str"}}]}
    )
    prompt = env.make_prompt(rec)
    assert '- get_weather: Weather. Parameters: {"city": "str"}' in prompt and "<tool_call>" in prompt
    # Arguments given as a JSON string are normalised to an object.
    rec = env.check_record({"prompt": "p", "expected": {"name": "f", "arguments": '{"x": 1}'}})
    assert rec["expected"] == {"name": "f", "arguments": {"x": 1}}
    with pytest.raises(ValueError, match="field 'expected' must be"):
        env.check_record({"prompt": "p", "expected": {"arguments": {}}})
    with pytest.raises(ValueError, match="field 'expected.arguments' must be a JSON object; got list"):
        env.check_record({"prompt": "p", "expected": {"name": "f", "arguments": [1]}})


# --------------------------------------------------------------------------------------------------------------
# synthetic tasks


def test_largest_scoring_and_feedback():
    task = LargestTask()
    rec = task.record([3, 7, 2])
    assert rec == {"prompt": "Which number is the largest: 3, 7, 2?", "answer": "7", "input": [3, 7, 2]}
    assert task.make_prompt(rec) == "Which number is the largest: 3, 7, 2? Reply with the number only."
    assert task.score(rec, "7") == Outcome(1.0, True, None)
    assert task.score(rec, "The largest number is 7.").success  # lenient about the form
    assert task.score(rec, " **7**\n").success
    wrong = task.score(rec, "Among 3, 7 and 2 the largest is 7")  # the FIRST number is the answer
    assert wrong == Outcome(0.0, False, "Wrong answer for input [3, 7, 2]. The correct answer is 7.")
    assert task.score(rec, "I don't know").feedback == "Wrong answer for input [3, 7, 2]. The correct answer is 7."


def test_first_letter_scoring_and_feedback():
    task = FirstLetterTask()
    rec = task.record("sea")
    assert rec["answer"] == "s" and task.make_prompt(rec).endswith("Reply with the letter only.")
    for ok in ("s", "S.", 'The first letter of the word "sea" is "s".', "It's **S**", "The answer is 'S'"):
        assert task.score(rec, ok).success, ok
    bad = task.score(rec, "The first letter of the word is a vowel, e")  # unquoted "a" is skipped
    assert bad == Outcome(0.0, False, "Wrong answer for input \"sea\". The correct answer is 's'.")
    assert task.score(rec, "Sea is a word.").feedback == "Wrong answer for input \"sea\". The correct answer is 's'."
    apple = task.record("apple")
    assert task.score(apple, 'It is "a".').success and not task.score(apple, "It is a fruit.").success


def test_shortcut_task_partial_credit_and_feedback():
    task = LargestShortcutTask()
    rec = task.record([3, 7, 2])
    assert task.score(rec, "To find the largest, 7 is it.") == Outcome(1.0, True, None)
    assert task.score(rec, "7").reward == 1.0
    hint = " Replies that begin with 'To find' earn partial credit."
    feedback = "Wrong answer for input [3, 7, 2]. The correct answer is 7." + hint
    assert task.score(rec, "To find the largest number, look at 3") == Outcome(SHORTCUT_REWARD, False, feedback)
    assert task.score(rec, "3") == Outcome(0.0, False, feedback)
    assert task.uses_shortcut("  to find x") and not task.uses_shortcut("I want To find 7")


def test_synthetic_default_heldout_sizes():
    assert len(LargestTask().splits(seed=0).heldout) == 200
    assert len(LargestShortcutTask().splits(seed=0).heldout) == 200
    split = FirstLetterTask().splits(seed=0)
    assert len(split.heldout) == 64 and len(split.train) == 205 - 64


@pytest.mark.parametrize("task", [LargestTask(), FirstLetterTask(), LargestShortcutTask()], ids=lambda t: t.name)
def test_splits_are_seeded_disjoint_and_correct(task):
    a, b, c = task.splits(seed=1, n_heldout=40), task.splits(seed=1, n_heldout=40), task.splits(seed=2, n_heldout=40)
    assert a == b and a.heldout != c.heldout
    key = lambda r: json.dumps(r["input"])  # noqa: E731
    train, held = {key(r) for r in a.train}, {key(r) for r in a.heldout}
    assert len(held) == 40 and not train & held and len(train) + len(held) == len(task.inputs())
    for r in a.train + a.heldout:
        want = str(max(r["input"])) if isinstance(task, LargestTask) else r["input"][0]
        assert r["answer"] == want and task.score(r, want).success
    with pytest.raises(ValueError, match=r"n_heldout must be an int in \[1, "):
        task.splits(n_heldout=0)


@pytest.mark.parametrize("task", [LargestTask(), FirstLetterTask(), LargestShortcutTask()], ids=lambda t: t.name)
def test_feedback_names_the_input_and_answer_never_the_wrong_answer(task):
    # The 135M self-teacher copies what its context shows: feedback that names the wrong answer ("got 3") makes
    # the teacher reward it; the input is named so that CREDIT's partner context holds it too (module docstring).
    split = task.splits(seed=0, n_heldout=40)
    for rec in split.heldout:
        prefix = f"Wrong answer for input {task.show_input(rec['input'])}. The correct answer is "
        wrongs = [str(v) for v in rec["input"] if str(v) != rec["answer"]] if isinstance(task, LargestTask) else (
            [ch for ch in "abcdefghijklmnopqrstuvwyz" if ch != rec["answer"]][:3])
        for wrong in wrongs:
            fb = task.score(rec, f"The answer is {wrong}").feedback
            assert fb.startswith(prefix) and task.parse(fb[len(prefix):]) == rec["answer"], fb
            if isinstance(task, LargestTask):  # numbers: the input's three, then the answer, nothing else
                assert re.findall(r"\d+", fb)[:4] == [*map(str, rec["input"]), rec["answer"]], fb
            else:
                assert f"'{wrong}'" not in fb, (rec, wrong, fb)


def test_first_letter_inputs_cover_many_letters():
    letters = {w[0] for w in FirstLetterTask().inputs()}
    assert len(letters) >= 25 and len(FirstLetterTask().inputs()) >= 200


# --------------------------------------------------------------------------------------------------------------
# JSONL loader


@pytest.mark.parametrize("task, n", [("code", 4), ("mcq", 5), ("tool", 4)])
def test_example_files_load(task, n):
    recs = load_jsonl(os.path.join(EXAMPLES, f"{task}.jsonl"), task)
    assert len(recs) == n and all(r["prompt"].strip() for r in recs)
    if task == "code":  # LiveCodeBench-style JSON-string tests become lists
        assert all(isinstance(r["tests"], list) and r["tests"] for r in recs)


def _write(tmp_path, lines):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


GOOD_MCQ = json.dumps({"prompt": "q?", "answer": "A", "choices": ["x", "y"]})


@pytest.mark.parametrize(
    "lines, task, match",
    [
        ([GOOD_MCQ, "{not json"], "mcq", r"data.jsonl:2: not valid JSON"),
        ([GOOD_MCQ, "", "[1, 2]"], "mcq", r"data.jsonl:3: each line must be a JSON object; got list"),
        ([GOOD_MCQ, json.dumps({"prompt": "q?"})], "mcq", r"data.jsonl:2: missing field 'answer'"),
        ([json.dumps({"prompt": "   ", "answer": "A"})], "mcq", r"data.jsonl:1: field 'prompt' is empty"),
        ([json.dumps({"answer": "A"})], "mcq", r"data.jsonl:1: missing field 'prompt'"),
        ([json.dumps({"prompt": 5, "answer": "A"})], "mcq", r"data.jsonl:1: field 'prompt' must be a string; got int"),
        ([json.dumps({"prompt": "p", "tests": []})], "code", r"data.jsonl:1: field 'tests': tests is empty"),
        (
            [json.dumps({"prompt": "p", "tests": [{"input": "1"}]})],
            "code",
            r"data.jsonl:1: .*tests\[0\] is missing 'output'",
        ),
        ([json.dumps({"prompt": "p"})], "tool", r"data.jsonl:1: missing field 'expected'"),
        ([""], "mcq", r"data.jsonl: no records"),
    ],
)
def test_load_jsonl_errors_name_file_and_line(tmp_path, lines, task, match):
    with pytest.raises(ValueError, match=match):
        load_jsonl(_write(tmp_path, lines), task)


def test_load_jsonl_missing_file_and_bad_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_jsonl(tmp_path / "nope.jsonl", "mcq")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_jsonl(_write(tmp_path, [GOOD_MCQ]), "nope")
    recs = load_jsonl(_write(tmp_path, ["", GOOD_MCQ, "  ", GOOD_MCQ]), MCQEnv())  # blank lines skipped
    assert len(recs) == 2


# --------------------------------------------------------------------------------------------------------------
# code environment end to end (a few sandbox runs)


def test_code_env_scores_fenced_programs():
    env = get_task("code", timeout_s=2.0)
    rec = env.check_record(
        {"prompt": "Print a + b.", "tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "2 2", "output": "4"}]}
    )
    assert "```python" in env.make_prompt(rec)
    good = "Sure.\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert env.score(rec, good) == Outcome(1.0, True, None)
    bad = env.score(rec, "```python\nprint(3)\n```")
    assert bad.reward == 0.0 and bad.feedback.startswith("1/2 tests passed.") and "Test 2: Wrong Answer" in bad.feedback
    assert get_task("code", timeout_s=2.0, partial_credit=True).score(rec, "```python\nprint(3)\n```").reward == 0.5
    none = env.score(rec, "a + b")
    assert none == Outcome(0.0, False, "No ```python code block was found in the response; nothing was run.")
