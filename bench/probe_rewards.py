"""Probe the dense rewards of one batch of rollouts before training: does a task design make CREDIT learn?

A training run takes 6-10 minutes on 2 CPU cores; this probe takes one or two. It loads the model once, samples
`--batches` batches of rollouts from the UNTRAINED student (the trainer's own `rollout`), and then, for every
feedback variant named in `--feedback`, rebuilds the wrong responses' feedback, scores the aligned and shuffled
teacher pairs (`CreditTeacher.pairs`, `CreditTeacher.score`) and prints, per token class, the mean of

    sdpo = a - s,   contrast = a - beta,   credit = a - s - lam (beta - s)       (docs/method.md, "Token rewards")

Token classes (`classify`): the ANSWER token (the token where the parsed answer first appears) of correct and
of wrong responses (split into wrong answers copied from the input's first listed element and the others),
the FIRST token of responses that do not start with the answer, the end-of-turn token right
after a bare answer and elsewhere, and every other token. A design that lets CREDIT learn has a large positive
(correct - wrong) gap on the answer token under `credit` and small generic penalties (first token, end of turn).
Rollouts do not depend on the feedback, so all variants are scored on the same responses.

    OMP_NUM_THREADS=1 python bench/probe_rewards.py --feedback current,legacy,not_largest
    OMP_NUM_THREADS=1 python bench/probe_rewards.py --task first_letter --max-new-tokens 32 --json /tmp/probe.json

Each variant also reports what the teacher itself answers (greedy) in its aligned contexts: SDPO pulls the student
towards the teacher, so a teacher that rambles or repeats the feedback's wrong answer teaches exactly that.

Feedback variants (`FEEDBACK`): a function (task, record, got) -> text, got the parsed wrong answer or None.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from credit.config import TrainConfig
from credit.evaluation import mean_interval
from credit.rollouts import HFSampler, stop_ids
from credit.methods import student_logprobs
from credit.trainer import rollout, setup


def _current(task, rec, got):
    return task.score(rec, "" if got is None else got).feedback


def _legacy(task, rec, got):
    shown = "nothing" if got is None else got
    return f"Expected {rec['answer']} for input {task.show_input(rec['input'])}, got {shown}."


def _direction(task, rec, got):
    # answer-free but input-specific: whether the wrong answer was too small or too large
    if got is None or not got.lstrip("-").isdigit():
        return "Your reply does not start with a number."
    return "Your answer is too small." if int(got) < int(rec["answer"]) else "Your answer is too large."


# name -> (task, record, got) -> feedback text of a wrong response
FEEDBACK = {
    "current": _current,  # whatever the task's score() says today
    "legacy": _legacy,  # the earlier failing-test text: "Expected 9 for input [4, 9, 7], got 7."
    "expected": lambda t, r, g: f"Expected {r['answer']}.",
    "correct_is": lambda t, r, g: f"Wrong answer. The correct answer is {r['answer']}.",
    "wrong": lambda t, r, g: "Wrong answer.",
    "not_largest": lambda t, r, g: ("Your reply does not start with a number." if g is None
                                    else f"{g} is not the largest number."),
    "direction": _direction,
    "reply_only": lambda t, r, g: f"Wrong answer. The correct answer is {r['answer']}. Reply with the number only.",
    "number_only": lambda t, r, g: "Wrong answer. Reply with the largest number only.",
    "should_reply": lambda t, r, g: f"You should have replied: {r['answer']}",
    "just": lambda t, r, g: f"Wrong answer. Reply with just the number {r['answer']}.",
    "none": lambda t, r, g: None,  # no environment text: only a successful sibling teaches
    # the input named in the feedback too: the partner context (x_j, f_i) then also holds x_i's numbers, so
    # restating one's own input stops earning a contrast a - beta > 0
    "input_correct": lambda t, r, g: (f"Wrong answer for input {t.show_input(r['input'])}. "
                                      f"The correct answer is {t.show_answer(r['answer'])}."),
}


def answer_token(task, tokenizer, tokens: list[int]) -> int | None:
    """Index of the token at which the task's parser first finds an answer in the decoded prefix, or None."""
    for k in range(len(tokens)):
        if task.parse(tokenizer.decode(tokens[: k + 1], skip_special_tokens=True)) is not None:
            return k
    return None


CLASSES = ("answer_ok", "answer_bad", "answer_copy", "first_pre", "eos_short", "eos", "other")


def first_listed(record: dict) -> str | None:
    """The first element of a list input ("largest": the first listed number), as the parser would return it."""
    x = record.get("input")
    return str(x[0]) if isinstance(x, (list, tuple)) and x else None


def classify(task, tokenizer, batch, stops: set[int], records: list[dict] | None = None) -> list[list[str]]:
    """Per response, the class of each token (`CLASSES`): the answer token of a correct / wrong response (a wrong
    answer that is the input's first listed element, copied from the prompt, is `answer_copy` when `records` are
    given, one per prompt), the first token of a response that does not start with its answer (a preamble), the
    end of turn within two tokens after the answer ("7<|im_end|>", "7.<|im_end|>"), any other end of turn, and the
    rest."""
    out = []
    g = len(batch.responses) // len(records) if records else 0
    for i, resp in enumerate(batch.responses):
        k = answer_token(task, tokenizer, resp)
        cls = ["other"] * len(resp)
        if resp and k != 0:
            cls[0] = "first_pre"
        if resp and resp[-1] in stops:
            cls[-1] = "eos_short" if k is not None and len(resp) - 1 - k <= 2 else "eos"
        if k is not None:
            ok = bool(batch.rollout.success[i])
            copied = bool(records) and task.parse(batch.rollout.texts[i]) == first_listed(records[i // g])
            cls[k] = "answer_ok" if ok else "answer_copy" if copied else "answer_bad"
        out.append(cls)
    return out


def probe_variant(cfg, run, batches, name: str) -> dict:
    """Mean sdpo / contrast / credit per token class over all batches, with this feedback variant."""
    fn = FEEDBACK[name]
    values = defaultdict(lambda: defaultdict(list))  # class -> reward -> one value per token
    seq = defaultdict(list)  # success -> per-response summed credit reward
    greedy = []
    stops = stop_ids(run.student, run.tokenizer)
    for step, (batch, records) in enumerate(batches):
        g = cfg.rollouts_per_prompt
        rb = batch.rollout
        rb.feedback = [None if bool(rb.success[i]) else
                       fn(run.env, records[i // g], run.env.parse(rb.texts[i])) for i in range(len(rb.texts))]
        pairs = run.credit_teacher.pairs(rb, step=step)
        greedy.append(teacher_greedy(cfg, run, pairs, records))
        width = batch.response_mask.shape[1]
        scores = run.credit_teacher.score(rb, step=step, width=width, device="cpu")
        a, b = scores.aligned, scores.shuffled
        with torch.no_grad():
            s = student_logprobs(run.student, batch, list(range(len(batch))))
        beta = b.mean(0)
        rewards = {"sdpo": a - s, "contrast": a - beta, "credit": a - s - cfg.lam * (beta - s)}
        classes = classify(run.env, run.tokenizer, batch, stops, records)
        for i, cls in enumerate(classes):
            if not pairs.mask[i]:
                continue
            for t, c in enumerate(cls):
                for key, r in rewards.items():
                    values[c][key].append(float(r[i, t]))
            seq[bool(batch.rollout.success[i])].append(float(rewards["credit"][i, : len(cls)].sum()))
    table = {}
    for c, by_key in values.items():
        table[c] = {"n": len(by_key["sdpo"])}
        for key, vs in by_key.items():
            mean, lo, hi = mean_interval(vs) if len(vs) > 1 else (vs[0], None, None)
            table[c] |= {key: mean, f"{key}_interval": None if lo is None else [lo, hi]}
    n = sum(gr["n"] for gr in greedy)
    table["teacher_greedy"] = {k: sum(gr[k] * gr["n"] for gr in greedy) / max(1, n) for k in
                               ("accuracy", "answer_first", "mean_len")} | {"n": n, "examples": greedy[0]["examples"]}
    table["seq_credit"] = {"ok": sum(seq[True]) / max(1, len(seq[True])),
                           "bad": sum(seq[False]) / max(1, len(seq[False])),
                           "n_ok": len(seq[True]), "n_bad": len(seq[False])}
    return table


def teacher_greedy(cfg, run, pairs, records) -> dict:
    """What the teacher itself answers in its aligned contexts c(x, f) (greedy): SDPO pulls the student towards
    this distribution, so a teacher that rambles or echoes the feedback teaches exactly that."""
    g = cfg.rollouts_per_prompt
    ctx = {}
    for i, c in pairs.pairs_aligned:
        ctx.setdefault(c, records[i // g])
    teacher = run.teacher if run.teacher is not None else run.student
    outs = HFSampler(teacher, run.tokenizer, cfg).sample([pairs.contexts[c] for c in ctx], 1, greedy=True)
    texts = [run.tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    ok = [run.env.score(rec, t).success for rec, t in zip(ctx.values(), texts)]
    first = [answer_token(run.env, run.tokenizer, o) == 0 for o in outs]
    return {"n": len(texts), "accuracy": sum(ok) / max(1, len(ok)), "answer_first": sum(first) / max(1, len(first)),
            "mean_len": sum(map(len, outs)) / max(1, len(outs)), "examples": texts[:4]}


def _row(table: dict, c: str) -> str:
    if c not in table:
        return f"  {c:<11} (none)"
    r = table[c]

    def cell(key):
        ci = r[f"{key}_interval"]
        return f"{key} {r[key]:+.2f}" + ("" if ci is None else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]")

    return f"  {c:<11} n={r['n']:<4} " + "  ".join(map(cell, ("sdpo", "contrast", "credit")))


def report(name: str, table: dict) -> None:
    print(f"feedback={name}")
    for c in CLASSES:
        print(_row(table, c))
    for bad in ("answer_bad", "answer_copy"):
        if "answer_ok" in table and bad in table:
            gap = {k: table["answer_ok"][k] - table[bad][k] for k in ("sdpo", "contrast", "credit")}
            print(f"  answer gap (ok - {bad[7:]}): sdpo {gap['sdpo']:+.2f}  contrast {gap['contrast']:+.2f}  "
                  f"credit {gap['credit']:+.2f}")
    tg = table["teacher_greedy"]
    print(f"  teacher greedy in its contexts: accuracy {tg['accuracy']:.2f}  answer first {tg['answer_first']:.2f}  "
          f"length {tg['mean_len']:.1f} (n={tg['n']}); e.g. {tg['examples'][:3]}")
    sc = table["seq_credit"]
    print(f"  sequence credit sum: ok {sc['ok']:+.2f} (n={sc['n_ok']})  bad {sc['bad']:+.2f} (n={sc['n_bad']})")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="largest")
    p.add_argument("--feedback", default="current", help=f"comma-separated variants of {sorted(FEEDBACK)}")
    p.add_argument("--instruction", default=None, help="replace the task's instruction sentence")
    p.add_argument("--batches", type=int, default=4, help="rollout batches (steps 0..batches-1 of the data order)")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--rollouts-per-prompt", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the tables here")
    args = p.parse_args(argv)
    names = args.feedback.split(",")
    for n in names:
        if n not in FEEDBACK:
            raise ValueError(f"--feedback: unknown variant {n!r}; known: {sorted(FEEDBACK)}")
    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1; got {args.batches}")
    cfg = TrainConfig(task=args.task, prompts_per_step=args.prompts_per_step,
                      rollouts_per_prompt=args.rollouts_per_prompt, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, lam=args.lam, seed=args.seed, method="credit", progress=False)
    t0 = time.perf_counter()
    run = setup(cfg)
    if args.instruction is not None:
        run.env.instruction = args.instruction
    batches = []
    for step in range(args.batches):
        batch, records, _ = rollout(cfg, step, run.student, run.tokenizer, run.env, run.train_records)
        batches.append((batch, records))
    acc = sum(float(b.rollout.success.float().mean()) for b, _ in batches) / len(batches)
    print(f"task={args.task} instruction={run.env.instruction!r} max_new_tokens={args.max_new_tokens} "
          f"rollout accuracy {acc:.3f} over {args.batches} x {len(batches[0][0])} responses "
          f"({time.perf_counter() - t0:.0f} s)")
    out = {"args": vars(args), "rollout_accuracy": acc, "variants": {}}
    for name in names:
        t1 = time.perf_counter()
        out["variants"][name] = table = probe_variant(cfg, run, batches, name)
        report(name, table)
        print(f"  ({time.perf_counter() - t1:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
