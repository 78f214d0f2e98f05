"""The driver-side context step on a tiny batch: teacher rows in the layout verl's workers read, and the CREDIT
fields CreditPPOTrainer writes back, against naive per-pair teacher forwards of a tiny random Llama.

TransferQueue and the worker group are replaced by in-process fakes that follow verl 0.9.1's contracts
(kv_batch_put / kv_batch_get / kv_clear on jagged per-sample rows; a worker's ``log_probs`` over prompt + response,
position j holding log p(token j + 1)). No Ray, no GPU.
"""

import pytest
import torch

pytest.importorskip("verl.protocol")
pytest.importorskip("transfer_queue")

from omegaconf import OmegaConf  # noqa: E402
from transfer_queue import KVBatchMeta  # noqa: E402
from verl.utils.tensordict_utils import list_of_dict_to_tensordict  # noqa: E402

import credit  # noqa: E402
from credit.integrations.verl import contexts as ctx_mod  # noqa: E402
from credit.integrations.verl import trainer as trainer_mod  # noqa: E402
from credit.integrations.verl.loss import FIELD_MASK, FIELD_SHUFFLED, FIELD_TEACHER, CreditLossConfig  # noqa: E402

CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    hf.chat_template = CHAT
    return hf


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


def token_logprobs(model, ids):
    """log p(ids[t] | ids[:t]) for t = 1..L-1, one plain forward (the naive reference)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


# A batch of P = 3 prompts x 2 rollouts. Group "q0": one success (its sibling gets the solution as feedback; the
# success itself has no other success: mask 0); "q1": none and no env feedback (mask 0); "q2": both successes
# (each gets the other's text).
PROMPTS = {"q0": "What is 2+3?", "q1": "Name a prime.", "q2": "Spell cat."}
ROLLOUTS = [("q0", "It is 5.", 1.0), ("q0", "It is 6.", 0.0), ("q1", "Nine.", 0.0), ("q1", "Four.", 0.0),
            ("q2", "c-a-t", 1.0), ("q2", "C A T", 1.0)]


def batch_fields(tok):
    responses = [tok.encode(text, add_special_tokens=False) + [tok.eos_token_id] for _, text, _ in ROLLOUTS]
    rows = []
    for (uid, _, score), resp in zip(ROLLOUTS, responses):
        rm = torch.zeros(len(resp))
        rm[-1] = score
        rows.append({"responses": torch.tensor(resp), "response_mask": torch.ones(len(resp), dtype=torch.int64),
                     "rm_scores": rm, "uid": uid, "raw_prompt": [{"role": "user", "content": PROMPTS[uid]}]})
    return rows, responses


class FakeTQ:
    """In-memory stand-in for transfer_queue's kv API (per-key rows of fields)."""

    def __init__(self):
        self.store = {}
        self.cleared = []

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        for j, key in enumerate(keys):
            row = self.store.setdefault((partition_id, key), {})
            if fields is not None:
                for name in fields.keys():
                    col = fields[name]
                    row[name] = col.unbind(0)[j] if isinstance(col, torch.Tensor) else col[j]
        return KVBatchMeta(keys=list(keys), tags=list(tags or [{} for _ in keys]), partition_id=partition_id)

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        rows = []
        for key in keys:
            row = self.store[(partition_id, key)]
            missing = [f for f in select_fields if f not in row]
            if missing:
                raise KeyError(f"fields {missing} not in TransferQueue for {key}")
            rows.append({f: row[f] for f in select_fields})
        return list_of_dict_to_tensordict(rows)

    def kv_clear(self, keys, partition_id):
        for key in keys:
            self.store.pop((partition_id, key))
        self.cleared.extend(keys)


class FakeWorkerGroup:
    """compute_ref_log_prob / compute_log_prob as verl's workers answer them: log_probs over prompt + response."""

    def __init__(self, tq, model, dp_size=None):
        self.tq, self.model, self.calls = tq, model, []
        if dp_size is not None:
            self._dispatch_info = {"ref": list(range(dp_size)), "actor": list(range(dp_size))}

    def _score(self, meta):
        self.calls.append(len(meta.keys))
        assert meta.extra_info["compute_loss"] is False
        for key in meta.keys:
            row = self.tq.store[(meta.partition_id, key)]
            ids = row["input_ids"].tolist()
            assert ids == row["prompts"].tolist() + row["responses"].tolist()
            assert row["position_ids"].tolist() == list(range(len(ids)))
            lp = torch.zeros(len(ids))
            lp[:-1] = token_logprobs(self.model, ids).float()
            row["log_probs"] = lp
        return meta

    compute_ref_log_prob = _score
    compute_log_prob = _score


def reference_fields(tok, model, responses, num_partners, swap, seed, step):
    """a, b, mask per response: the pipeline's own pairs (credit.CreditTeacher.pairs) and one plain forward per pair."""
    batch = credit.RolloutBatch(
        prompts=[[{"role": "user", "content": PROMPTS[u]}] for u, _, _ in ROLLOUTS], response_ids=responses,
        group_ids=ctx_mod.group_index([u for u, _, _ in ROLLOUTS]), success=[s >= 1.0 for _, _, s in ROLLOUTS],
    )
    teacher = credit.CreditTeacher(model, tok, method="credit", num_partners=num_partners, swap=swap, seed=seed,
                                   backend="naive")
    pairs = teacher.pairs(batch, step=step)
    a = [torch.zeros(len(r), dtype=torch.float64) for r in responses]
    b = [torch.zeros(len(r), num_partners, dtype=torch.float64) for r in responses]
    for k, slot in enumerate([pairs.pairs_aligned, *pairs.pairs_shuffled]):
        for i, c in slot:
            ctx = pairs.contexts[c]
            lp = token_logprobs(model, ctx + responses[i])[len(ctx) - 1:]
            if k == 0:
                a[i] = lp
            else:
                b[i][:, k - 1] = lp
    return a, b, torch.tensor(pairs.mask)


def test_teacher_rows_have_the_fields_verl_workers_read(tok):
    rows, responses = batch_fields(tok)
    c = ctx_mod.build_credit_contexts(tok, [r["raw_prompt"] for r in rows], [r["uid"] for r in rows], responses,
                                      [s >= 1 for _, _, s in ROLLOUTS], num_partners=2, seed=7)
    assert c.feedback_mask.tolist() == [False, True, False, False, True, True]
    assert c.num_rows == 3 * 3  # 3 responses with feedback x (aligned + 2 partners)
    td = c.teacher_batch(pad_to_multiple=4)
    assert td.batch_size[0] == 12
    for name in ctx_mod.TEACHER_ROW_FIELDS:
        assert td[name].is_nested, name
    for r, (i, k) in enumerate(c.row_index.tolist()):
        p, resp = td["prompts"].unbind(0)[r].tolist(), td["responses"].unbind(0)[r].tolist()
        assert resp == responses[i]
        assert td["input_ids"].unbind(0)[r].tolist() == p + resp
        assert td["position_ids"].unbind(0)[r].tolist() == list(range(len(p) + len(resp)))
        assert td["response_mask"].unbind(0)[r].tolist() == [1] * len(resp)
        text = tok.decode(p)
        own = PROMPTS[ROLLOUTS[i][0]]
        assert (own in text) == (k == 0)  # aligned rows hold the response's own prompt, shuffled ones a partner's
    # padding repeats the last row; row_index covers the real rows only
    assert td["input_ids"].unbind(0)[-1].tolist() == td["input_ids"].unbind(0)[c.num_rows - 1].tolist()


@pytest.mark.parametrize("teacher, dp_size", [("frozen", None), ("live", 4)])
@pytest.mark.parametrize("swap", ["input", "context"])
def test_trainer_step_writes_credit_fields_equal_to_naive_teacher(tok, model, monkeypatch, teacher, dp_size, swap):
    fake = FakeTQ()
    monkeypatch.setattr(trainer_mod, "tq", fake)
    rows, responses = batch_fields(tok)
    keys = [f"uid{i}_0_0" for i in range(len(rows))]
    # verl's padding sample (upsample_batch_to_divisible_size): a copy of a real row under its own uid
    pad_row = dict(rows[0], uid="pad0123", rm_scores=torch.zeros(len(responses[0])))
    fake.kv_batch_put(keys + ["pad_0_0"], "train", list_of_dict_to_tensordict(rows + [pad_row]))
    batch = KVBatchMeta(keys=keys + ["pad_0_0"], tags=[{} for _ in keys] + [{"is_padding": True}],
                        partition_id="train")

    trainer = object.__new__(trainer_mod.CreditPPOTrainer)
    trainer.config = OmegaConf.create({"actor_rollout_ref": {"rollout": {"temperature": 1.0}}})
    trainer.credit_config = CreditLossConfig(lam=0.5, num_partners=2, swap=swap, teacher=teacher, seed=3)
    trainer.tokenizer = tok
    trainer.global_steps = 4
    trainer.ref_in_actor = False
    trainer.ref_policy_wg = FakeWorkerGroup(fake, model, dp_size)
    trainer.actor_rollout_wg = FakeWorkerGroup(fake, model, dp_size)
    metrics = {}
    trainer._compute_credit_fields(batch, metrics)

    used = trainer.ref_policy_wg if teacher == "frozen" else trainer.actor_rollout_wg
    other = trainer.actor_rollout_wg if teacher == "frozen" else trainer.ref_policy_wg
    assert len(used.calls) == 1 and not other.calls
    assert used.calls[0] % (dp_size or 1) == 0
    assert not [k for (_, k) in fake.store if k.startswith("credit_teacher_")]  # teacher rows cleared

    got = fake.kv_batch_get(keys, "train", [FIELD_TEACHER, FIELD_SHUFFLED, FIELD_MASK])
    a_ref, b_ref, fmask = reference_fields(tok, model, responses, 2, swap, seed=3, step=4)
    for i in range(len(rows)):
        mask_i = got[FIELD_MASK].unbind(0)[i]
        assert mask_i.tolist() == [int(fmask[i])] * len(responses[i])
        if fmask[i]:
            torch.testing.assert_close(got[FIELD_TEACHER].unbind(0)[i].double(), a_ref[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[FIELD_SHUFFLED].unbind(0)[i].double(), b_ref[i], atol=1e-5, rtol=1e-5)
        else:
            assert (got[FIELD_TEACHER].unbind(0)[i] == 0).all()
    pad = fake.kv_batch_get(["pad_0_0"], "train", [FIELD_TEACHER, FIELD_SHUFFLED, FIELD_MASK])
    assert pad[FIELD_MASK].unbind(0)[0].tolist() == [0] * len(responses[0])
    assert (pad[FIELD_SHUFFLED].unbind(0)[0] == 0).all() and pad[FIELD_SHUFFLED].unbind(0)[0].shape[-1] == 2
    assert metrics["credit/teacher_rows"] == 9
    assert metrics["credit/feedback_frac"] == pytest.approx(3 / 6)


def test_assemble_rejects_a_row_of_the_wrong_length(tok):
    rows, responses = batch_fields(tok)
    c = ctx_mod.build_credit_contexts(tok, [r["raw_prompt"] for r in rows], [r["uid"] for r in rows], responses,
                                      [s >= 1 for _, _, s in ROLLOUTS], num_partners=1)
    bad = [torch.zeros(len(responses[i]) + (1 if r == 0 else 0)) for r, (i, _) in enumerate(c.row_index.tolist())]
    with pytest.raises(ValueError, match="row 0 .* log-probs"):
        ctx_mod.assemble_credit_fields(c, bad)


def test_one_prompt_group_is_refused_for_credit(tok):
    with pytest.raises(ValueError, match="P = 1"):
        ctx_mod.build_credit_contexts(tok, ["q", "q"], ["u", "u"], [[1, 2], [3]], [True, False], num_partners=1)


def test_without_distillation_and_config_checks():
    cfg = OmegaConf.create({"distillation": {"enabled": True, "distillation_loss": {"loss_mode": "k3"}}})
    off = trainer_mod.without_distillation(cfg)
    assert off.distillation.enabled is False and cfg.distillation.enabled is True
    with pytest.raises(ValueError, match="distillation.enabled=true"):
        trainer_mod.credit_loss_config(off)
    dl = {"_target_": "verl.workers.config.DistillationLossConfig", "loss_mode": "k3"}
    with pytest.raises(ValueError, match="must be a CreditLossConfig"):
        trainer_mod.credit_loss_config(OmegaConf.create({"distillation": {"enabled": True, "distillation_loss": dl}}))
    dl = {"_target_": "credit.integrations.verl.CreditLossConfig", "loss_mode": "credit", "lam": 0.25}
    got = trainer_mod.credit_loss_config(OmegaConf.create({"distillation": {"enabled": True, "distillation_loss": dl}}))
    assert isinstance(got, CreditLossConfig) and got.lam == 0.25
