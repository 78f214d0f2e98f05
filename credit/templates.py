r"""Teacher contexts for SDPO and CREDIT: feedback selection, SDPO's reprompt, aligned and shuffled pairs.

See docs/method.md ("Feedback and teacher contexts") and arXiv 2605.11613 (CREDIT), arXiv 2601.20802 (SDPO). The teacher scores the
student's exact response tokens y_i after a feedback-conditioned context c(x, f):

    c(x, f) = chat_template(user: "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n")
              + the assistant generation prompt
    solution = "\nCorrect solution:\n\n{text}\n\n"                     (omitted when there is none)
    feedback = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{text}\n\n"  (likewise)

Feedback f_i (``select_feedback``): a successful sibling from the same group other than y_i itself, its
``<think>...</think>`` removed, and/or the environment's text feedback for y_i. A response with neither gets mask 0.

Pairs (``build_teacher_pairs``): the aligned pair scores y_i after c(x_g(i), f_i); shuffled pair m scores it after
c(x_j, f_i) with j = pi_m(i) (``swap="input"``, default: swap the input, keep the feedback) or after c(x_j, f_j)
(``swap="context"``: the partner's whole context). Identical contexts are stored once, which is what the prefix
trie of the teacher scorer exploits.

Text substitution never interprets braces in user text: templates are filled by a single regex pass whose
replacements are inserted verbatim (a ``str.format``-style fill breaks on code and JSON holding ``{``/``}``; TRL's
SDPO trainer carries a regression test for exactly that,
``test_teacher_reprompt_preserves_curly_braces_in_solution_and_feedback``), and chat templates receive the reprompt
as message content, which Jinja does not re-render.
"""

from __future__ import annotations

import numbers
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from credit.options import SWAPS

__all__ = [
    "DEFAULT_TEMPLATE",
    "FeedbackSelection",
    "TeacherPairs",
    "TeacherTemplate",
    "build_teacher_context",
    "build_teacher_pairs",
    "render_reprompt",
    "select_feedback",
    "strip_think",
]



@dataclass(frozen=True)
class TeacherTemplate:
    """SDPO's reprompt templates; placeholders {prompt}, {solution}, {feedback} and {text}, filled verbatim."""

    reprompt: str = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n"
    solution: str = "\nCorrect solution:\n\n{text}\n\n"
    feedback: str = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{text}\n\n"

    def render(self, prompt: str, solution: str | None = None, feedback: str | None = None) -> str:
        """The teacher's user-turn text for (prompt, solution, feedback): see ``render_reprompt``.

        This is the whole interface the teacher pipeline needs from a template: any object with a
        ``render(prompt, solution, feedback) -> str`` method can stand in for a TeacherTemplate.
        """
        return render_reprompt(prompt, solution, feedback, template=self)


DEFAULT_TEMPLATE = TeacherTemplate()

_PLACEHOLDER = re.compile(r"\{(prompt|solution|feedback|text)\}")
_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)
_OPEN, _CLOSE = "<think>", "</think>"


def _fill(template: str, values: Mapping[str, str]) -> str:
    # One pass; a function replacement is inserted as is (no backslash or brace processing, no rescan).
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def strip_think(text: str) -> str:
    """Remove ``<think>...</think>`` blocks (and the whitespace after each) from a response.

    Also handled: a leading block whose ``<think>`` was emitted by the chat template (the text starts inside the
    block, so only ``</think>`` appears: everything up to it is removed), and an unterminated ``<think>`` (a
    response cut inside its reasoning: everything from it on is removed).

    Args:
        text: a response's text.

    Returns:
        The text without reasoning blocks.
    """
    if not isinstance(text, str):
        raise TypeError(f"strip_think: text must be a str; got {type(text).__name__}")
    close = text.find(_CLOSE)
    if close != -1 and _OPEN not in text[:close]:
        text = text[close + len(_CLOSE):].lstrip()
    text = _THINK_BLOCK.sub("", text)
    start = text.find(_OPEN)
    if start != -1:  # no </think> follows (complete blocks are gone)
        text = text[:start]
    return text


def render_reprompt(
    prompt: str,
    solution: str | None = None,
    feedback: str | None = None,
    *,
    template: TeacherTemplate = DEFAULT_TEMPLATE,
) -> str:
    """The teacher's user-turn text: SDPO's reprompt with the solution / feedback sections (None = omitted).

    Args:
        prompt: the original user prompt x.
        solution: a successful sibling's text (already think-stripped) or None.
        feedback: the environment's feedback text or None.
        template: the three templates (default: SDPO's).

    Returns:
        The reprompt string; braces in prompt, solution and feedback are kept verbatim.
    """
    for name, v in (("prompt", prompt), ("solution", solution), ("feedback", feedback)):
        if v is not None and not isinstance(v, str):
            raise TypeError(f"render_reprompt: {name} must be a str or None; got {type(v).__name__}")
    sol = "" if solution is None else _fill(template.solution, {"text": solution})
    fb = "" if feedback is None else _fill(template.feedback, {"text": feedback})
    return _fill(template.reprompt, {"prompt": prompt, "solution": sol, "feedback": fb})


class FeedbackSelection(NamedTuple):
    """Per-response feedback, each of length B."""

    solutions: list[str | None]
    """A successful sibling's think-stripped text, or None."""
    feedbacks: list[str | None]
    """The environment's feedback text, or None."""
    mask: torch.Tensor
    """[B] bool: True where the response has a solution or a feedback (it gets a teacher signal)."""


def _as_list(fn: str, name: str, x, num: int) -> list:
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if not isinstance(x, Sequence) or isinstance(x, (str, bytes)):
        raise TypeError(f"{fn}: {name} must be a list of length B = {num}; got {type(x).__name__}")
    if len(x) != num:
        raise ValueError(f"{fn}: {name} must have length B = {num} (one per response); got {len(x)}")
    return list(x)


def _group_list(fn: str, group_ids) -> list[int]:
    if isinstance(group_ids, torch.Tensor):
        if group_ids.dim() != 1 or group_ids.is_floating_point() or group_ids.dtype == torch.bool:
            got = f"{group_ids.dtype} of shape {tuple(group_ids.shape)}"
            raise TypeError(f"{fn}: group_ids must be a [B] integer tensor; got {got}")
        return [int(g) for g in group_ids.tolist()]
    if not isinstance(group_ids, Sequence) or isinstance(group_ids, (str, bytes)):
        raise TypeError(f"{fn}: group_ids must be a [B] integer tensor or list of ints; got {type(group_ids).__name__}")
    out = []
    for i, g in enumerate(group_ids):
        if isinstance(g, bool) or not isinstance(g, numbers.Integral):
            raise TypeError(f"{fn}: group_ids must hold ints; got {type(g).__name__} {g!r} at index {i}")
        out.append(int(g))
    return out


def select_feedback(
    group_ids,
    successes,
    responses_text: Sequence[str],
    env_feedback: Sequence[str | None] | None,
    *,
    seed: int = 0,
    feedback_only_without_solution: bool = False,
) -> FeedbackSelection:
    """Pick each response's feedback: a successful sibling (never itself) and/or its environment feedback.

    The successes of each group are put in a seeded order (``random.Random(seed)``, groups visited in sorted id
    order); response i takes the first one in that order that is not i and is non-empty after ``strip_think``.
    So all failing responses of a group get the *same* solution (their teacher contexts share a prefix), and a
    successful response gets the group's first other success.

    Args:
        group_ids: [B] integer tensor or list of ints.
        successes: [B] bool (or 0/1) tensor or list: whether each response counts as a successful demonstration.
        responses_text: B response texts (as decoded for the teacher).
        env_feedback: B texts or None entries (empty / whitespace-only counts as None), or None for no feedback.
        seed: seed of the demonstration choice.
        feedback_only_without_solution: drop the environment feedback when a solution was found (SDPO's
            ``environment_feedback_only_without_solution``); default False keeps both (docs/method.md).

    Returns:
        FeedbackSelection(solutions, feedbacks, mask [B] bool).
    """
    fn = "select_feedback"
    gids = _group_list(fn, group_ids)
    num = len(gids)
    succ = [bool(s) for s in _as_list(fn, "successes", successes, num)]
    texts = _as_list(fn, "responses_text", responses_text, num)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{fn}: responses_text must hold str; got {type(t).__name__} at index {i}")
    env = [None] * num if env_feedback is None else _as_list(fn, "env_feedback", env_feedback, num)
    for i, f in enumerate(env):
        if f is not None and not isinstance(f, str):
            raise TypeError(f"{fn}: env_feedback must hold str or None; got {type(f).__name__} at index {i}")

    rng = random.Random(seed)
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(gids):
        if succ[i]:
            by_group.setdefault(g, []).append(i)
    stripped: dict[int, str] = {}
    for g in sorted(by_group):
        rng.shuffle(by_group[g])
        for j in by_group[g]:
            stripped[j] = strip_think(texts[j])

    solutions: list[str | None] = []
    feedbacks: list[str | None] = []
    for i, g in enumerate(gids):
        sol = next((stripped[j] for j in by_group.get(g, ()) if j != i and stripped[j].strip()), None)
        fb = env[i] if env[i] is not None and env[i].strip() else None
        if feedback_only_without_solution and sol is not None:
            fb = None
        solutions.append(sol)
        feedbacks.append(fb)
    mask = torch.tensor([s is not None or f is not None for s, f in zip(solutions, feedbacks)], dtype=torch.bool)
    return FeedbackSelection(solutions, feedbacks, mask)


def _encode(tokenizer, text: str, *, add_special_tokens: bool) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return [int(t) for t in ids]


def build_teacher_context(
    tokenizer,
    prompt: str | Sequence[Mapping[str, Any]],
    solution: str | None = None,
    feedback: str | None = None,
    *,
    template: TeacherTemplate = DEFAULT_TEMPLATE,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Token ids of the teacher context c(x, f); the student's response ids follow them unchanged.

    With a chat template: the reprompt is the user turn (for a message list, it replaces the content of the last
    user message; earlier messages such as a system prompt are kept), rendered with ``add_generation_prompt=True``
    and encoded without adding special tokens again (as ``apply_chat_template(tokenize=True)`` does). Without a
    chat template: the plain reprompt text, encoded with the tokenizer's default special tokens (e.g. a BOS).

    Args:
        tokenizer: a transformers tokenizer (``encode``; ``apply_chat_template`` when it has a ``chat_template``).
        prompt: the user prompt x as a str, or a chat message list ({"role", "content"} dicts).
        solution: successful sibling text or None.
        feedback: environment feedback text or None.
        template: reprompt templates (default SDPO's): a TeacherTemplate, or any object with a
            ``render(prompt, solution, feedback) -> str`` method returning the user-turn text.
        chat_template_kwargs: extra keyword arguments for ``apply_chat_template`` (e.g. ``enable_thinking``).

    Returns:
        list[int] of token ids.
    """
    fn = "build_teacher_context"
    has_chat = getattr(tokenizer, "chat_template", None) is not None
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": template.render(prompt, solution, feedback)}]
        plain = messages[0]["content"]
    elif isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
        users = [k for k, m in enumerate(prompt) if m.get("role") == "user"]
        if not users:
            raise ValueError(f"{fn}: prompt is a message list without a 'user' message; got roles "
                             f"{[m.get('role') for m in prompt]}")
        if not has_chat:
            raise ValueError(f"{fn}: prompt is a message list but the tokenizer has no chat_template; pass the prompt "
                             "as a str or set tokenizer.chat_template")
        messages = [dict(m) for m in prompt]
        last = users[-1]
        messages[last]["content"] = template.render(messages[last]["content"], solution, feedback)
        plain = None
    else:
        raise TypeError(f"{fn}: prompt must be a str or a list of message dicts; got {type(prompt).__name__}")
    if not has_chat:
        return _encode(tokenizer, plain, add_special_tokens=True)
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **dict(chat_template_kwargs or {})
    )
    return _encode(tokenizer, text, add_special_tokens=False)


Pair = tuple[int, int]


@dataclass(frozen=True)
class TeacherPairs:
    """Teacher sequences to score, as (response_index, context_index) pairs over deduplicated contexts.

    The sequence of pair (i, c) is ``contexts[c] + responses_ids[i]``; the response occupies
    ``response_span((i, c)) = (start, end)`` of it, so the logits at positions start-1 .. end-2 predict it.
    Only responses with mask True get pairs (a response without solution and feedback has no teacher signal:
    scoring it would be wasted work), so ``pairs_aligned`` and each ``pairs_shuffled[m]`` list the masked-in
    responses in batch order.
    """

    contexts: list[list[int]]
    """Unique teacher contexts (token ids)."""
    pairs_aligned: list[Pair]
    """(i, c) with contexts[c] = c(x_g(i), f_i), for every i with mask True."""
    pairs_shuffled: list[list[Pair]]
    """[M] lists of (i, c) with contexts[c] the m-th partner's context, same responses and order as pairs_aligned."""
    responses_ids: list[list[int]] = field(repr=False)
    """The student's response token ids, [B] lists."""
    mask: list[bool] = field(repr=False)
    """[B]: whether response i has pairs."""

    @property
    def num_partners(self) -> int:
        return len(self.pairs_shuffled)

    def response_span(self, pair: Pair) -> tuple[int, int]:
        """(start, end) of the response tokens inside ``sequence(pair)``."""
        i, c = pair
        start = len(self.contexts[c])
        return start, start + len(self.responses_ids[i])

    def sequence(self, pair: Pair) -> list[int]:
        """The full teacher sequence: context ids then the response ids."""
        i, c = pair
        return self.contexts[c] + self.responses_ids[i]


def _prompts_by_group(fn: str, prompts, gids: list[int]) -> dict[int, Any]:
    if isinstance(prompts, Mapping):
        missing = sorted(set(gids) - set(prompts))
        if missing:
            raise ValueError(f"{fn}: prompts (a mapping group id -> prompt) lacks groups {missing}")
        return {g: prompts[g] for g in set(gids)}
    plist = _as_list(fn, "prompts", prompts, len(gids))
    out: dict[int, Any] = {}
    for i, (g, p) in enumerate(zip(gids, plist)):
        if g in out and out[g] != p:
            raise ValueError(f"{fn}: responses of group {g} have different prompts (first differing at index {i}); "
                             "all responses of a group must share its prompt")
        out.setdefault(g, p)
    return out


def build_teacher_pairs(
    tokenizer,
    prompts,
    group_ids,
    responses_ids: Sequence[Sequence[int]],
    solutions: Sequence[str | None],
    feedbacks: Sequence[str | None],
    partners: torch.Tensor | None,
    *,
    swap: str = "input",
    template: TeacherTemplate = DEFAULT_TEMPLATE,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> TeacherPairs:
    """Aligned and shuffled teacher pairs for a batch, over deduplicated contexts.

    Args:
        tokenizer: as in build_teacher_context.
        prompts: B prompts (one per response; equal within a group) or a mapping group id -> prompt. A prompt is a
            str or a chat message list.
        group_ids: [B] integer tensor or list of ints.
        responses_ids: B lists of the student's response token ids.
        solutions, feedbacks: B entries each, str or None (e.g. from select_feedback).
        partners: [B, M] partner group ids (``credit.partners``), or None for SDPO (no shuffled pairs).
        swap: "input" (default): shuffled context c(x_j, f_i), the partner's prompt with the response's own
            feedback. "context": c(x_j, f_j), the partner's whole context, where f_j is the (solution, feedback) of
            the first response of group j (batch order) that has either; if none in group j has, f_j is empty and
            the partner context is the bare reprompt of x_j.
        template, chat_template_kwargs: as in build_teacher_context.

    Returns:
        TeacherPairs. Responses with neither solution nor feedback (mask 0) get no pairs.
    """
    fn = "build_teacher_pairs"
    if swap not in SWAPS:
        raise ValueError(f"{fn}: swap must be 'input' or 'context'; got {swap!r}")
    gids = _group_list(fn, group_ids)
    num = len(gids)
    resp = [[int(t) for t in r] for r in _as_list(fn, "responses_ids", responses_ids, num)]
    sols = _as_list(fn, "solutions", solutions, num)
    fbs = _as_list(fn, "feedbacks", feedbacks, num)
    prompt_of = _prompts_by_group(fn, prompts, gids)
    if partners is None:
        part = [[] for _ in range(num)]
    else:
        if not isinstance(partners, torch.Tensor) or partners.dim() != 2 or partners.shape[0] != num:
            got = tuple(partners.shape) if isinstance(partners, torch.Tensor) else type(partners).__name__
            raise ValueError(f"{fn}: partners must be a [B, M] tensor with B = {num}; got {got}")
        part = partners.tolist()
        for i, row in enumerate(part):
            if gids[i] in row:
                raise ValueError(f"{fn}: partners[{i}] contains the response's own group {gids[i]}")
            unknown = set(row) - prompt_of.keys()
            if unknown:
                raise ValueError(f"{fn}: partners[{i}] names groups {sorted(unknown)} that have no prompt")
    num_partners = len(part[0]) if num else 0
    mask = [sols[i] is not None or fbs[i] is not None for i in range(num)]

    contexts: list[list[int]] = []
    index_of: dict[tuple[int, ...], int] = {}
    rendered: dict[tuple[int, str | None, str | None], int] = {}  # memo: tokenising is the cost

    def context(g: int, sol: str | None, fb: str | None) -> int:
        key = (g, sol, fb)
        if key not in rendered:
            ids = build_teacher_context(
                tokenizer, prompt_of[g], sol, fb, template=template, chat_template_kwargs=chat_template_kwargs
            )
            rendered[key] = index_of.setdefault(tuple(ids), len(contexts))
            if rendered[key] == len(contexts):
                contexts.append(ids)
        return rendered[key]

    group_feedback: dict[int, tuple[str | None, str | None]] = {}
    for i in range(num):
        if mask[i]:
            group_feedback.setdefault(gids[i], (sols[i], fbs[i]))

    pairs_aligned: list[Pair] = []
    pairs_shuffled: list[list[Pair]] = [[] for _ in range(num_partners)]
    for i in range(num):
        if not mask[i]:
            continue
        pairs_aligned.append((i, context(gids[i], sols[i], fbs[i])))
        for m, j in enumerate(part[i]):
            f = (sols[i], fbs[i]) if swap == "input" else group_feedback.get(j, (None, None))
            pairs_shuffled[m].append((i, context(j, *f)))
    return TeacherPairs(contexts, pairs_aligned, pairs_shuffled, resp, mask)
