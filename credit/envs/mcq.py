"""Multiple-choice environment (SciKnowEval-style): the answer goes in ``<answer>X</answer>``, exact match.

Matching rule (`normalize_answer`): the content of the LAST ``<answer>...</answer>`` tag (tags are
case-insensitive) and the record's answer are both normalised by collapsing whitespace runs to one space,
case-folding, and stripping surrounding whitespace, brackets, quotes and the punctuation ``. , : ;``; then
they must be equal. So ``<answer> (b). </answer>`` matches ``"B"``, but ``<answer>B) ethanol</answer>`` does
not. The last tag counts because a model may mention a tag while reasoning before its final answer.

`MCQPlainEnv` (task ``mcq_plain``) is the variant a small model can be trained on: the embedded SmolLM2-135M
almost never writes answer tags, so, as in the synthetic tasks, it asks for the bare letter and reads the FIRST
option the reply names, either as its letter ("B", "(B)", "B." but not the article "A" in "A cat") or as the
option's text as a whole word ("Nitrogen"). ``examples/data/make_mcq_basic.py`` builds its basic-knowledge data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from credit.envs.base import Outcome, clip, require_str

__all__ = ["MCQEnv", "MCQPlainEnv", "extract_answer", "normalize_answer"]

_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_STRIP = " \t\r\n()[]{}<>\"'`.,:;*"


def normalize_answer(text: str) -> str:
    """Whitespace collapsed, case-folded, surrounding brackets/quotes/``.,:;*`` and spaces stripped."""
    return " ".join(text.split()).casefold().strip(_STRIP)


def extract_answer(response: str) -> str | None:
    """The raw content of the last ``<answer>...</answer>`` tag, or None."""
    found = _TAG.findall(response)
    return found[-1] if found else None


def _letters(n: int) -> str:
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n]


class MCQEnv:
    """Multiple choice with an answer tag.

    Record: ``{"prompt": question, "answer": "B", "choices": ["...", "...", ...]}``; ``choices`` is optional
    (when given they are listed as ``A. ...``, ``B. ...`` and ``answer`` must be one of the letters).
    Reward 1.0 on an exact (normalised) match, else 0.0.

    Args:
        reveal_answer: put the correct answer in the feedback of a wrong response. Off by default: SDPO's
            science runs learn from sibling solutions, and a revealed letter lets the teacher copy it.
    """

    name = "mcq"

    def __init__(self, *, reveal_answer: bool = False):
        self.reveal_answer = reveal_answer

    def check_record(self, record: Mapping[str, Any]) -> dict[str, Any]:
        require_str(record, "prompt")
        answer = require_str(record, "answer")
        out = dict(record)
        if "choices" in record:
            choices = record["choices"]
            if not isinstance(choices, Sequence) or isinstance(choices, str) or not 2 <= len(choices) <= 26:
                raise ValueError(f"field 'choices' must be a list of 2..26 strings; got {choices!r:.80}")
            if not all(isinstance(c, str) and c.strip() for c in choices):
                raise ValueError("field 'choices' must hold non-empty strings")
            valid = _letters(len(choices))
            if normalize_answer(answer).upper() not in valid:
                raise ValueError(f"field 'answer' must be one of the choice letters {list(valid)}; got {answer!r}")
            out["choices"] = list(choices)
        return out

    def make_prompt(self, record: Mapping[str, Any]) -> str:
        parts = [record["prompt"].strip()]
        choices = record.get("choices")
        if choices:
            lettered = zip(_letters(len(choices)), choices, strict=True)
            parts.append("\n".join(f"{letter}. {c.strip()}" for letter, c in lettered))
            parts.append("Give the letter of the correct option inside answer tags, for example <answer>A</answer>.")
        else:
            parts.append("Give your final answer inside answer tags, for example <answer>42</answer>.")
        return "\n\n".join(parts)

    def score(self, record: Mapping[str, Any], response: str) -> Outcome:
        raw = extract_answer(response)
        if raw is None:
            return Outcome(
                0.0,
                False,
                "No <answer>...</answer> tag was found; the final answer must be written as <answer>X</answer>.",
            )
        if normalize_answer(raw) == normalize_answer(record["answer"]):
            return Outcome(1.0, True, None)
        text = f"The answer <answer>{clip(raw.strip(), 200)}</answer> is incorrect."
        if self.reveal_answer:
            text += f" The correct answer is {record['answer'].strip()}."
        return Outcome(0.0, False, text)


_LETTER = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")
_ARTICLE_NEXT = re.compile(r"[ \t]+[a-z]")


class MCQPlainEnv(MCQEnv):
    """Multiple choice without tags: the first option named in the reply (by letter or by its text) is the answer.

    Record: ``{"prompt", "choices": [...], "answer": letter}`` (choices required). Reward 1.0 when the first
    option named is the right one, else 0.0. The feedback of a wrong reply names the question and the correct
    option (``Wrong answer for "What is 2 + 3?". The correct option is B: 5.``), as the synthetic tasks do, so the
    self-teacher has the answer to copy and a partner's context (another question) does not.
    """

    name = "mcq_plain"
    instruction = "Reply with the letter of the correct option only."

    def __init__(self):
        super().__init__(reveal_answer=True)

    def check_record(self, record: Mapping[str, Any]) -> dict[str, Any]:
        if "choices" not in record:
            raise ValueError(f"missing field 'choices' (mcq_plain needs options; fields present: {sorted(record)})")
        return super().check_record(record)

    def make_prompt(self, record: Mapping[str, Any]) -> str:
        choices = record["choices"]
        lettered = "\n".join(f"{letter}. {c.strip()}" for letter, c in zip(_letters(len(choices)), choices))
        return f"{record['prompt'].strip()}\n{lettered}\n{self.instruction}"

    def parse(self, record: Mapping[str, Any], response: str) -> str | None:
        """The letter of the first option `response` names, or None."""
        choices = record["choices"]
        valid = _letters(len(choices))
        found = []  # (position, letter)
        for m in _LETTER.finditer(response):
            ch = m.group(1)
            if ch not in valid or (ch == "A" and _ARTICLE_NEXT.match(response, m.end())):
                continue  # not an option, or the article "A" ("A cat is ...")
            found.append((m.start(), ch))
            break
        for letter, text in zip(valid, choices):
            m = re.search(r"(?<!\w)" + re.escape(text.strip()) + r"(?!\w)", response, re.IGNORECASE)
            if m:
                found.append((m.start(), letter))
        return min(found)[1] if found else None

    def score(self, record: Mapping[str, Any], response: str) -> Outcome:
        answer = normalize_answer(record["answer"]).upper()
        if self.parse(record, response) == answer:
            return Outcome(1.0, True, None)
        right = record["choices"]["ABCDEFGHIJKLMNOPQRSTUVWXYZ".index(answer)].strip()
        return Outcome(0.0, False, f'Wrong answer for "{record["prompt"].strip()}". '
                                   f"The correct option is {answer}: {right}.")
