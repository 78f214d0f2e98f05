"""bench/probe_rewards.py's token classes: which token of which response each reward mean is taken over."""

from types import SimpleNamespace

import torch

from bench.probe_rewards import classify, first_listed
from credit.envs.synthetic import LargestTask


class _CharTokenizer:
    """One character per token; token 0 is the end of turn (dropped as a special token)."""

    vocab = ["<eot>"] + list("0123456789 .:abcdefghijklmnopqrstuvwxyz")

    def encode(self, text: str) -> list[int]:
        return [self.vocab.index(ch) for ch in text]

    def decode(self, ids, skip_special_tokens=False) -> str:
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i == 0))


def test_classify_splits_wrong_answers_copied_from_the_input():
    task, tok = LargestTask(), _CharTokenizer()
    records = [task.record([4, 9, 7]), task.record([8, 2, 3])]  # 2 prompts x 3 rollouts
    texts = ["9", "4", "the 7", "8", "3", "2."]
    responses = [tok.encode(t) + [0] for t in texts]
    success = torch.tensor([task.score(records[i // 3], t).success for i, t in enumerate(texts)])
    batch = SimpleNamespace(responses=responses, rollout=SimpleNamespace(success=success, texts=texts))
    assert first_listed(records[0]) == "4" and first_listed({"input": "word"}) is None
    got = classify(task, tok, batch, stops={0}, records=records)
    assert got[0] == ["answer_ok", "eos_short"]
    assert got[1] == ["answer_copy", "eos_short"]  # 4 is wrong and the first listed number
    assert got[2] == ["first_pre", "other", "other", "other", "answer_bad", "eos_short"]
    assert got[3] == ["answer_ok", "eos_short"]  # 8 is first listed but correct
    assert got[4] == ["answer_bad", "eos_short"] and got[5] == ["answer_bad", "other", "eos_short"]
    # without records there is no copy class
    assert classify(task, tok, batch, stops={0})[1] == ["answer_bad", "eos_short"]
