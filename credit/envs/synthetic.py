"""Synthetic tasks that the embedded SmolLM2-135M-Instruct can learn in minutes on a CPU.

The model is weak: asked simple questions at temperature 0.7 it is often wrong and almost never follows
an ``<answer>`` tag format. So the prompts ask for the bare answer and scoring is
lenient about the form but strict about the content: the FIRST number (``largest``) or the FIRST one-letter
word (``first_letter``; "a" and "I" used as English words are skipped) anywhere in the response is the
answer. A model that rambles "The largest number is 7" is right; one that repeats the question first
("3, 7 and 2: ...") is wrong, and learns to answer first.
Every answer depends on the input. The feedback of a wrong response reads like a failing test that names the
input and the expected answer but never the wrong answer: ``Wrong answer for input [3, 7, 2]. The correct answer
is 7.`` Both choices were measured with ``bench/probe_rewards.py`` (rewards of one batch of untrained rollouts)
and with training runs (README, "What the default run does"). The 135M self-teacher copies what its context
shows: the earlier text ``Expected 7 for input [3, 7, 2], got 3.`` made it raise the WRONG answer "3" (SDPO
reward +0.9 on it); without the input in the feedback, CREDIT's partner context (x_j, f_i) under the default
``swap="input"`` holds none of x_i's numbers, so restating one's own input earned a large contrast a - beta
(+0.9 on a wrong answer that is an input number, +3 on echoed question tokens) and runs drifted into
restating the question. Naming the input in f halves that (+0.44) while the teacher still copies the answer.

Tasks:

* ``largest``: the largest of three distinct numbers in [1, 9] (504 ordered triples).
* ``first_letter``: the first letter of a common English word (a fixed list of 205 words).
* ``largest_shortcut``: ``largest`` with an INPUT-GENERIC SHORTCUT for the CREDIT vs SDPO check. A response
  that does not find the right number but starts with ``To find`` (the preamble "To find the largest number,
  ..." the untrained model writes on its own) gets partial credit (`SHORTCUT_REWARD` = 0.25), and every
  feedback says so ("Replies that begin with 'To find' earn partial credit."). A teacher that reads this
  feedback makes ``To find`` likely whatever the input is: it raises SDPO's pMI without any input-specific
  reasoning, while CREDIT's contrast ``a - beta`` (same feedback, other input) cancels it. The shortcut is
  one the base policy actually takes: 39 of 400 untrained rollouts (9.8%, 95% interval 7.2-13.1%) start
  with it (``bench/study.py --base-rate``, ``bench/results/study_base_rate_largest_shortcut.json``). An
  earlier version rewarded replies starting with ``Answer:``, which the model never sampled, so no method
  could take it. `LargestShortcutTask.uses_shortcut` (the response starts with ``To find``) gives the
  shortcut rate next to accuracy. The hypothesis to measure (the paper's claim): SDPO raises the shortcut
  rate more than CREDIT does, and CREDIT's accuracy gain is at least as large.

Base accuracy of the embedded model, measured (2-core CPU, SmolLM2-135M-Instruct dequantised to fp32, chat
template, 16 new tokens, held-out split of seed 0, ``bench/results/study_base.json``): ``largest`` greedy 0.640
and sampled (temperature 0.7) 0.300 on 200 triples; ``first_letter`` greedy 0.953 and sampled 0.602 on 64
words. Greedy ``first_letter`` is near its ceiling; the sampled accuracies leave room to improve.

Splits are seeded and disjoint: ``task.splits(seed=s, n_heldout=k)`` shuffles the task's whole input set with
``random.Random(s)``, holds out the first k inputs (default: the task's `default_heldout`, 200 of the 504
triples for ``largest``, 64 of the 205 words for ``first_letter``) and trains on the rest, so held-out accuracy measures
generalisation to unseen inputs. Records are plain dicts ``{"prompt", "answer", "input"}``.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from credit.envs.base import Outcome, require_str

__all__ = [
    "SHORTCUT_REWARD",
    "SHORTCUT_TOKEN",
    "SYNTHETIC_TASKS",
    "FirstLetterTask",
    "LargestShortcutTask",
    "LargestTask",
    "Split",
    "SyntheticTask",
]

SHORTCUT_TOKEN = "To find"
SHORTCUT_REWARD = 0.25

# Common, short, concrete words; their first letters cover 25 of 26 letters (all but x).
_WORDS = (
    "apple ant arm army air angel animal answer baby ball bank bed bird boat book bread bridge brother cake "
    "camera candle car castle cat chair cheese child city cloud coat cow cup dance desk dinner doctor dog door "
    "dragon dream duck eagle ear earth egg elephant engine eye face farm father field fire fish flag flower "
    "forest fox friend frog garden gate ghost gift girl glass goat gold grass guitar hair hand hat heart hill "
    "horse house ice idea island iron jacket jam jar jelly jet jewel job juice jungle key kid king kitchen kite "
    "knife lake lamp leaf lemon letter light lion lunch machine map market milk money monkey moon mother "
    "mountain mouse music nail name needle nest net night nose note nut ocean office oil onion orange owl page "
    "paint paper park pencil piano pig pillow plane plate pocket queen question quilt rabbit radio rain river "
    "road robot rock roof room rope salt sand school sea sheep shirt shoe sister sky snake snow song spoon star "
    "stone sun table teacher tent tiger toy train tree truck turtle umbrella uncle unicorn van vase village "
    "violin voice wagon wall water whale wheel window wing winter wolf yard yarn year yellow zebra zoo zero "
    "basket valley"
).split()

_NUMBER = re.compile(r"-?\d+")
# A one-letter word: no letter on either side, and not the "s" of "it's" or the "I" of "I'm".
_ONE_LETTER = re.compile(r"(?<![A-Za-z])(?<![A-Za-z]['\u2019])([A-Za-z])(?![A-Za-z])(?!['\u2019][A-Za-z])")
_QUOTES = "\"'*`(\u201c\u2018"
_WORD_NEXT = re.compile(r"[ \t]+[A-Za-z]")


@dataclass(frozen=True)
class Split:
    """Disjoint train and held-out records of a synthetic task."""

    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]


class SyntheticTask:
    """Base class: a finite, ordered input set, a record builder and a first-token answer parser."""

    name = "synthetic"
    instruction = ""
    default_heldout = 64  # held-out inputs of `splits` when n_heldout is not given

    def inputs(self) -> list[Any]:
        """Every input of the task, in a fixed order."""
        raise NotImplementedError

    def record(self, x: Any) -> dict[str, Any]:
        """The record of one input: ``{"prompt", "answer", "input"}``."""
        raise NotImplementedError

    def parse(self, response: str) -> str | None:
        """The answer read from a response, or None."""
        raise NotImplementedError

    @staticmethod
    def show_input(x: Any) -> str:
        return repr(x)

    @staticmethod
    def show_answer(answer: str) -> str:
        """The answer as the feedback writes it."""
        return answer

    def splits(self, *, seed: int = 0, n_heldout: int | None = None) -> Split:
        """Seeded disjoint split: shuffle all inputs with `seed`, hold out the first `n_heldout` (None: the
        task's `default_heldout`).

        Returns:
            `Split` whose ``train`` holds every other input (in shuffled order; cycle through it).
        """
        xs = self.inputs()
        if n_heldout is None:
            n_heldout = self.default_heldout
        if not isinstance(n_heldout, int) or not 0 < n_heldout < len(xs):
            raise ValueError(f"{self.name}.splits: n_heldout must be an int in [1, {len(xs) - 1}]; got {n_heldout!r}")
        order = list(range(len(xs)))
        random.Random(seed).shuffle(order)
        recs = [self.record(xs[i]) for i in order]
        return Split(train=recs[n_heldout:], heldout=recs[:n_heldout])

    def make_prompt(self, record: Mapping[str, Any]) -> str:
        return f"{record['prompt'].strip()} {self.instruction}"

    def check_record(self, record: Mapping[str, Any]) -> dict[str, Any]:
        require_str(record, "prompt")
        require_str(record, "answer")
        if "input" not in record:
            raise ValueError(f"missing field 'input' (fields present: {sorted(record)})")
        return dict(record)

    def _wrong(self, record: Mapping[str, Any], got: str | None) -> str:
        # `got` is deliberately unused: a teacher shown the wrong answer copies it (module docstring)
        return (f"Wrong answer for input {self.show_input(record['input'])}. "
                f"The correct answer is {self.show_answer(record['answer'])}.")

    def score(self, record: Mapping[str, Any], response: str) -> Outcome:
        got = self.parse(response)
        if got is not None and got == record["answer"]:
            return Outcome(1.0, True, None)
        return Outcome(0.0, False, self._wrong(record, got))


class LargestTask(SyntheticTask):
    """The largest of three distinct numbers in [low, high]; the answer is the first integer in the response."""

    name = "largest"
    instruction = "Reply with the number only."
    default_heldout = 200  # of 504 triples: a one-answer flip moves accuracy by 0.005

    def __init__(self, *, low: int = 1, high: int = 9):
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low and high - low >= 3):
            raise ValueError(f"LargestTask: need ints 0 <= low and high - low >= 3; got low={low!r}, high={high!r}")
        self.low, self.high = low, high

    def inputs(self) -> list[list[int]]:
        return [list(t) for t in itertools.permutations(range(self.low, self.high + 1), 3)]

    def record(self, x: list[int]) -> dict[str, Any]:
        a, b, c = x
        return {"prompt": f"Which number is the largest: {a}, {b}, {c}?", "answer": str(max(x)), "input": list(x)}

    def parse(self, response: str) -> str | None:
        m = _NUMBER.search(response)
        return None if m is None else str(int(m.group()))

    @staticmethod
    def show_input(x: Any) -> str:
        return str(list(x))


class FirstLetterTask(SyntheticTask):
    """The first letter of a word; the answer is the first one-letter word of the response, case-insensitive
    (``The first letter of "sea" is "s".`` -> ``s``). Unquoted "a" and "I" followed by another word ("is a
    vowel", "I think") are skipped as English words."""

    name = "first_letter"
    instruction = "Reply with the letter only."

    def inputs(self) -> list[str]:
        return list(_WORDS)

    def record(self, x: str) -> dict[str, Any]:
        return {"prompt": f'What is the first letter of the word "{x}"?', "answer": x[0].lower(), "input": x}

    def parse(self, response: str) -> str | None:
        for m in _ONE_LETTER.finditer(response):
            ch = m.group(1)
            quoted = m.start() > 0 and response[m.start() - 1] in _QUOTES
            # "a" and "I" followed by another word ("a vowel", "I think") are English, not answers; a bare,
            # quoted or bold "a" ("a", '"a"', "**a**.") is an answer.
            if ch in ("a", "I") and not quoted and _WORD_NEXT.match(response, m.end()):
                continue
            return ch.lower()
        return None

    @staticmethod
    def show_input(x: Any) -> str:
        return f'"{x}"'

    @staticmethod
    def show_answer(answer: str) -> str:
        return f"'{answer}'"


class LargestShortcutTask(LargestTask):
    """`LargestTask` with an input-generic shortcut: a wrong reply that starts with ``To find`` earns
    `SHORTCUT_REWARD`, and every feedback advertises it (see the module docstring)."""

    name = "largest_shortcut"

    @staticmethod
    def uses_shortcut(response: str) -> bool:
        """The response starts with the shortcut ``To find`` (leading spaces and case ignored)."""
        return response.lstrip().casefold().startswith(SHORTCUT_TOKEN.casefold())

    def score(self, record: Mapping[str, Any], response: str) -> Outcome:
        got = self.parse(response)
        if got is not None and got == record["answer"]:
            return Outcome(1.0, True, None)
        reward = SHORTCUT_REWARD if self.uses_shortcut(response) else 0.0
        hint = f" Replies that begin with '{SHORTCUT_TOKEN}' earn partial credit."
        return Outcome(reward, False, self._wrong(record, got) + hint)


SYNTHETIC_TASKS: dict[str, type[SyntheticTask]] = {
    "largest": LargestTask,
    "first_letter": FirstLetterTask,
    "largest_shortcut": LargestShortcutTask,
}
