"""Build the `mcq_plain` data: basic-knowledge multiple-choice questions (4 options) that the embedded
SmolLM2-135M-Instruct answers above zero, split into train and held-out files.

    python examples/data/make_mcq_basic.py            # writes mcq_basic_train.jsonl, mcq_basic_heldout.jsonl here

Question families (each record's "family" field): one-digit addition and subtraction, category membership ("Which of these is a
fruit?"), opposites, the next day / month / letter, and plurals. Every record is
``{"id", "family", "prompt", "choices": [4 strings], "answer": "A".."D"}``; the correct option's position is
drawn uniformly, so no letter is right more often than chance. Deterministic (``random.Random(0)``): rerunning
gives byte-identical files. The split is stratified by family, one third held out.
"""

from __future__ import annotations

import json
import os
import random

CATEGORIES = {
    "fruit": "apple banana cherry grape lemon mango orange peach pear plum strawberry watermelon".split(),
    "animal": "cat dog horse cow lion tiger rabbit sheep monkey elephant bear wolf".split(),
    "color": "red blue green yellow purple orange pink brown black white gray".split(),
    "vehicle": "car bus truck train bicycle airplane boat motorcycle tractor helicopter".split(),
    "body part": "hand foot nose ear eye arm leg knee elbow finger mouth".split(),
    "piece of furniture": "chair table bed sofa desk shelf wardrobe stool bench cabinet".split(),
    "musical instrument": "piano guitar violin drum flute trumpet harp cello saxophone".split(),
}
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
             ("day", "night"), ("open", "closed"), ("full", "empty"), ("old", "young"), ("light", "dark"),
             ("hard", "soft"), ("wet", "dry"), ("tall", "short"), ("rich", "poor"), ("early", "late"),
             ("left", "right"), ("strong", "weak"), ("loud", "quiet"), ("clean", "dirty"), ("thick", "thin"),
             ("win", "lose"), ("push", "pull"), ("buy", "sell"), ("in", "out"), ("black", "white")]
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = ("January February March April May June July August September October November December").split()
PLURALS = [("cat", "cats"), ("dog", "dogs"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"),
           ("foot", "feet"), ("tooth", "teeth"), ("man", "men"), ("woman", "women"), ("baby", "babies"),
           ("city", "cities"), ("knife", "knives"), ("leaf", "leaves"), ("bus", "buses"), ("fish", "fish"),
           ("sheep", "sheep"), ("goose", "geese"), ("wolf", "wolves"), ("glass", "glasses"), ("toy", "toys")]


def _plural_distractors(word: str, right: str) -> list[str]:
    cands = [word + "s", word + "es", word + "ies", word + "en", word[:-1] + "ves", word + "z"]
    return [c for c in dict.fromkeys(cands) if c != right]


def questions(rng: random.Random) -> list[dict]:
    out = []
    for a in range(1, 10):  # addition
        for b in range(1, 10):
            right = a + b
            wrong = rng.sample([v for v in range(max(0, right - 4), right + 5) if v != right], 3)
            out.append(("addition", f"What is {a} + {b}?", str(right), [str(w) for w in wrong]))
    for a in range(1, 10):  # subtraction, non-negative results
        for b in range(1, a + 1):
            right = a - b
            wrong = rng.sample([v for v in range(max(0, right - 4), right + 5) if v != right], 3)
            out.append(("subtraction", f"What is {a} - {b}?", str(right), [str(w) for w in wrong]))
    for cat, members in CATEGORIES.items():  # category membership
        others = sorted({w for c, ms in CATEGORIES.items() if c != cat for w in ms} - set(members))
        for w in members:
            out.append(("category", f"Which of these is a {cat}?", w, rng.sample(others, 3)))
    words = sorted({w for pair in OPPOSITES for w in pair})
    for x, y in OPPOSITES:  # opposites, both ways
        for q, right in ((x, y), (y, x)):
            out.append(("opposite", f'What is the opposite of "{q}"?', right,
                        rng.sample([w for w in words if w not in (q, right)], 3)))
    for seq, what in ((DAYS, "day"), (MONTHS, "month")):  # the next day / month
        for i, x in enumerate(seq):
            right = seq[(i + 1) % len(seq)]
            out.append(("next", f"Which {what} comes after {x}?", right,
                        rng.sample([s for s in seq if s not in (x, right)], 3)))
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for i in range(25):  # the next letter
        right = letters[i + 1]
        out.append(("next", f"Which letter comes after {letters[i]} in the alphabet?", right,
                    rng.sample([c for c in letters if c not in (letters[i], right)], 3)))
    for w, right in PLURALS:  # plurals
        out.append(("plural", f'What is the plural of "{w}"?', right, rng.sample(_plural_distractors(w, right), 3)))
    records = []
    for k, (family, prompt, right, wrong) in enumerate(out):
        choices = list(wrong)
        pos = rng.randrange(4)
        choices.insert(pos, right)
        records.append({"id": f"{family}-{k}", "family": family, "prompt": prompt, "choices": choices,
                        "answer": "ABCD"[pos]})
    return records


def split(records: list[dict], rng: random.Random, heldout_frac: float = 1 / 3) -> tuple[list[dict], list[dict]]:
    """Stratified by family: shuffle each family, hold out round(frac * size) of it."""
    train, heldout = [], []
    for family in dict.fromkeys(r["family"] for r in records):
        group = [r for r in records if r["family"] == family]
        rng.shuffle(group)
        k = round(heldout_frac * len(group))
        heldout += group[:k]
        train += group[k:]
    return train, heldout


def main() -> None:
    rng = random.Random(0)
    train, heldout = split(questions(rng), rng)
    here = os.path.dirname(os.path.abspath(__file__))
    for name, recs in (("mcq_basic_train.jsonl", train), ("mcq_basic_heldout.jsonl", heldout)):
        with open(os.path.join(here, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
        print(f"wrote {len(recs)} records to {name}")


if __name__ == "__main__":
    main()
