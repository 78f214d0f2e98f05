r"""CREDIT inside TRL: `CreditSDPOTrainer`, a drop-in subclass of `trl.experimental.sdpo.SDPOTrainer` (trl==1.16.0).

CREDIT (arXiv 2605.11613) replaces SDPO's token reward a - s by

    r = a - s - lam * (beta - s),    beta = mean_m b^m  (or log-mean-exp),  b^m = log T(y | c(x_pi_m(i), f_i), y_<)

where the M shuffled teachers see another group's prompt (a seeded group-level derangement over the GLOBAL batch)
with the response's own feedback (``swap="input"``) or the partner's whole context (``swap="context"``). At logit
level (``distillation_mode="topk_logits"``) the teacher becomes log T~(v) = log T(v) + lam * (s(v) - beta(v)),
renormalised over the student's top-k + tail buckets. lam = 0 is SDPO.

What changes against the stock trainer (everything else is TRL's: generation, rewards, advantages, EMA / live /
base teachers, IS clipping, the distillation_weight mix, logging, checkpointing):

- Teacher contexts: TRL's own `SuccessfulRolloutTeacherContextBuilder` renders the aligned context (so lam = 0 is
  exactly stock SDPO); a subclass records the (solution, feedback) texts it used and renders the shuffled contexts
  with TRL's own templates. Feedback texts and prompts are gathered across processes, partners are drawn with the
  same seed on every rank, and each rank scores only its own responses.
- Teacher log-probs (``teacher_scoring="packed"``, default): TRL's contexts become a `credit.TeacherPairs` (the
  aligned and the M shuffled pairs of the local batch) that `credit.CreditTeacher.score(pairs=...)` /
  ``score_topk(pairs=...)`` scores in one packed prefix-trie forward: no [B, T, V] teacher logits.
  ``teacher_scoring="trl"`` keeps TRL's padded teacher forward (full logits; one per context set), e.g. as a peer in
  benchmarks. Either way the token rewards come from `CreditTeacher.rewards` and the top-k target from
  `CreditTeacher.topk_target`.
- Student log-probs: final hidden states of the trainer's own (wrapped, so DDP syncs) forward, projected by the fused
  `linear_logprob` (sampled token) or `linear_topk` (top-k support): no [B, T, V] student logits. With
  ``share_prompts=True`` (default) that forward runs packed: the micro-batch's prompts + completions form one prefix
  trie (a group's prompt once), fed through the same wrapped module with the trie's position ids while tree
  attention is plugged in (`credit.packed_student`'s layout); the hidden states at the completion rows are scattered
  back to TRL's [B, T] layout, so the policy loss, IS clipping and the distillation terms see the same tensors.
  It runs under activation checkpointing too (TRL's default: the backward's layer replays attend over the trie).
  Falls back to the padded forward where `credit.packed_student.packed_unsupported` names a reason (e.g. attention
  dropout in training, a compiled model) or the masks are not TRL's left/right padding.

Unsupported (a clear error at construction): PEFT models, FSDP, DeepSpeed ZeRO-3 (the fused heads and the packed
scorer need the full LM head and teacher weights on every rank), the teacher server, ``distillation_mode=
"full_logits"``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate.utils import gather_object, is_peft_model
from trl.experimental.sdpo import SDPOConfig, SDPOTrainer
from trl.experimental.sdpo.loss_utils import add_tail_bucket, apply_importance_sampling_clipping, compute_divergence
from trl.experimental.sdpo.sdpo_trainer import SuccessfulRolloutTeacherContextBuilder, _extract_last_user_text
from trl.trainer.utils import pad, selective_log_softmax

from credit.options import method_option_error
from credit.packed_student import packed_unsupported
from credit.pairing import partner_draw_seed
from credit.pairing import partners as draw_partners
from credit.pipeline import CreditTeacher, TeacherLogprobs, TopkTeacher
from credit.scoring.attention import TreeState, tree_attention_active
from credit.scoring.chunks import pred_index
from credit.templates import TeacherPairs
from credit_kernels.linear_logprob import linear_logprob
from credit_kernels.linear_topk import linear_topk
from credit_kernels.prefix_trie import build_prefix_trie
from credit_kernels.tree_attention import tree_attention_plan

__all__ = ["CreditSDPOConfig", "CreditSDPOTrainer"]

_SCORING = ("packed", "trl")


@dataclass
class CreditSDPOConfig(SDPOConfig):
    r"""`SDPOConfig` plus CREDIT's options (every SDPO field keeps its meaning and default).

    > Parameters that control CREDIT

    lam (`float`, defaults to `0.5`): debiasing weight in [0, 1]; 0 is SDPO, 1 the pure contrast a - beta.
    num_partners (`int`, defaults to `1`): M shuffled teacher contexts per response, 0 <= M <= P - 1 over the global
        batch's P prompts; 0 only with lam = 0.
    baseline (`str`, defaults to `"mean"`): beta over the M shuffled teachers, "mean" or "logmeanexp".
    swap (`str`, defaults to `"input"`): "input" scores after c(x_j, f_i) (the partner's prompt, own feedback);
        "context" after c(x_j, f_j) (the partner's whole context).
    teacher_scoring (`str`, defaults to `"packed"`): "packed" (one prefix-trie forward for the aligned and shuffled
        pairs, fused heads) or "trl" (TRL's padded teacher forwards with full logits).
    partner_seed (`int`, defaults to `0`): seed of the partner draw; step s uses partner_seed * 17 + s on
        every rank (`credit.pairing.partner_draw_seed`, as CreditTeacher and the verl integration).
    scorer_max_tokens (`int`, defaults to `32768`): unique tokens per packed teacher forward (bounds memory).
    share_prompts (`bool`, defaults to `True`): run the student's forward over the micro-batch's prefix trie of
        prompts + completions, each group's prompt computed once (forward and backward), through the trainer's
        wrapped module (DDP / DeepSpeed ZeRO-1/2 gradient sync unchanged); the same log-probs, losses and gradients
        as the padded forward up to float rounding, with or without activation checkpointing (TRL's default
        `gradient_checkpointing=True`: the backward's layer replays attend over the trie too). Falls back to the
        padded forward (per micro-batch, with one warning per reason; `trainer.last_student_path` says which ran)
        when `credit.packed_student.packed_unsupported(model)` names a reason: a family without tree attention
        support, attention dropout in training, sequences beyond a sliding window; or for a torch.compile'd model
        (`torch_compile` / accelerate's dynamo backend); or when the masks are not left-padded prompts /
        right-padded completions, or no completion has a token. False: always the padded forward.
    """

    lam: float = field(default=0.5, metadata={"help": "CREDIT debiasing weight in [0, 1] (0 = SDPO)."})
    num_partners: int = field(
        default=1, metadata={"help": "Shuffled teacher contexts per response, M in [0, P - 1]; 0 only with lam=0."}
    )
    baseline: str = field(default="mean", metadata={"help": "beta over the M shuffled teachers: mean | logmeanexp."})
    swap: str = field(
        default="input", metadata={"help": "Shuffled context: input = c(x_j, f_i), context = c(x_j, f_j)."}
    )
    teacher_scoring: str = field(
        default="packed", metadata={"help": "Teacher log-probs: packed (prefix-trie forward) | trl (padded forwards)."}
    )
    partner_seed: int = field(default=0, metadata={"help": "Partner draw seed; step s uses partner_seed * 17 + s."})
    scorer_max_tokens: int = field(default=32768, metadata={"help": "Unique tokens per packed teacher forward."})
    share_prompts: bool = field(
        default=True, metadata={"help": "Student forward over the prompt trie (each prompt once); padded fallback."}
    )

    def __post_init__(self):
        super().__post_init__()
        wrong = method_option_error(lam=self.lam, num_partners=self.num_partners, baseline=self.baseline,
                                    swap=self.swap, min_partners=0)
        if wrong:
            raise ValueError(f"`{wrong[0]}` {wrong[1]}, got {getattr(self, wrong[0])!r}.")
        if self.teacher_scoring not in _SCORING:
            raise ValueError(f"`teacher_scoring` must be one of {_SCORING}, got {self.teacher_scoring!r}.")
        if self.distillation_mode == "full_logits":
            raise ValueError(
                "`distillation_mode='full_logits'` is not supported by CreditSDPOTrainer (it needs [B, T, V] teacher "
                "logits); use 'topk_logits' (CREDIT's contrastive teacher) or 'sampled_token'."
            )
        if self.distillation_mode == "topk_logits" and self.distillation_topk is None:
            raise ValueError("`distillation_mode='topk_logits'` requires `distillation_topk` to be set.")
        if self.scorer_max_tokens < 1:
            raise ValueError(f"`scorer_max_tokens` must be >= 1, got {self.scorer_max_tokens}.")
        if not isinstance(self.share_prompts, bool):
            raise ValueError(f"`share_prompts` must be a bool, got {self.share_prompts!r}.")


class _CreditContextBuilder(SuccessfulRolloutTeacherContextBuilder):
    """TRL's builder (aligned contexts unchanged) that also renders the shuffled partner contexts."""

    def _build_reprompt_text(self, prompt_text: str, solution_text: str, feedback_text: str) -> str:
        self._used.append((solution_text, feedback_text))  # called once per active local sample, in order
        return super()._build_reprompt_text(prompt_text, solution_text, feedback_text)

    def _render(self, prompt, solution_text: str, feedback_text: str):
        # the same message layout as the parent's build (system turns kept, last user turn reprompted)
        if isinstance(prompt, list):
            text = super()._build_reprompt_text(_extract_last_user_text(prompt), solution_text, feedback_text)
            return prompt[:-1] + [{"role": "user", "content": text}]
        return super()._build_reprompt_text(prompt, solution_text, feedback_text)

    def build(self, output, prompts, rewards, feedbacks=None):
        self._used = []
        out = super().build(output, prompts, rewards, feedbacks=feedbacks)
        trainer = self.trainer
        args = trainer.args
        active = out["self_distillation_mask"].detach().cpu().bool().tolist()
        used = iter(self._used)
        local_texts = [next(used) if a else None for a in active]
        num_local, num_partners = len(prompts), args.num_partners
        device = trainer.accelerator.device
        if num_partners == 0:
            empty = torch.zeros(num_local, 0, 1, dtype=torch.long, device=device)
            self.last_partner_batch = {"credit_partner_ids": empty, "credit_partner_mask": empty.clone()}
            return out
        mode = "train" if trainer.model.training else "eval"
        num_gen = trainer.num_generations if mode == "train" else trainer.num_generations_eval
        all_prompts = gather_object(prompts)
        all_texts = gather_object(local_texts)
        total = len(all_prompts)
        group_ids = [i // num_gen for i in range(total)]
        seed = partner_draw_seed(args.partner_seed, trainer._step)  # as CreditTeacher and verl draw them
        try:
            part = draw_partners(group_ids, num_partners, seed=seed).tolist()  # [B_global, M], same on every rank
        except ValueError as err:
            raise ValueError(f"CreditSDPOTrainer: cannot draw {num_partners} partners over the global batch of "
                             f"{total // num_gen} prompts ({err}). Use more prompts per step or lam=0.") from err
        first_texts: dict[int, tuple[str, str]] = {}
        for i, t in enumerate(all_texts):
            if t is not None:
                first_texts.setdefault(group_ids[i], t)
        start = trainer.accelerator.process_index * num_local
        messages = []
        for gi in range(start, start + num_local):
            own = all_texts[gi] if all_texts[gi] is not None else ("", "")
            for j in part[gi]:
                sol, fb = own if args.swap == "input" else first_texts.get(j, ("", ""))
                messages.append(self._render(all_prompts[j * num_gen], sol, fb))
        ids = trainer._tokenize_prompts_untruncated(messages)
        ids = [torch.as_tensor(x[-args.max_reprompt_len :], dtype=torch.long) for x in ids]
        pid = pad(ids, padding_value=trainer._tokenizer.pad_token_id, padding_side="left")
        pmask = pad([torch.ones(len(x), dtype=torch.long) for x in ids], padding_value=0, padding_side="left")
        self.last_partner_batch = {
            "credit_partner_ids": pid.view(num_local, num_partners, -1).to(device),  # [B, M, Lp] left-padded
            "credit_partner_mask": pmask.view(num_local, num_partners, -1).to(device),
        }
        return out


def _compiled(model) -> bool:
    """Whether a torch.compile wrapper sits anywhere in model's wrapper chain (DDP / DeepSpeed `.module`)."""
    for _ in range(8):
        if model is None:
            return False
        if hasattr(model, "_orig_mod"):
            return True
        model = getattr(model, "module", None)
    return False


def _unpad(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return ids[mask.bool()].tolist()


class CreditSDPOTrainer(SDPOTrainer):
    """`SDPOTrainer` with CREDIT rewards / the contrastive teacher and packed, fused scoring (module docstring).

    Takes exactly SDPOTrainer's arguments; `args` must be a `CreditSDPOConfig`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, CreditSDPOConfig):
            raise TypeError(f"CreditSDPOTrainer: args must be a CreditSDPOConfig; got {type(self.args).__name__}")
        self._refuse_unsupported()
        self.teacher_context_builder = _CreditContextBuilder(self)
        self._teacher: CreditTeacher | None = None
        self._teacher_key: tuple | None = None
        self.last_teacher_time_s = 0.0
        self.last_token_rewards: torch.Tensor | None = None  # sampled-token mode: the last step's CREDIT rewards
        self.last_student_path: str | None = None  # "packed" or "padded": the last student forward
        self.last_student_fallback: str | None = None  # why the last one ran padded with share_prompts on
        self.last_student_tokens: tuple[int, int] | None = None  # packed: (unique tokens run, padded path's tokens)
        self._fallbacks_warned: set[str] = set()

    def _prepare_training_batch(self, inputs):
        batch = super()._prepare_training_batch(inputs)
        batch.update(self.teacher_context_builder.last_partner_batch)  # [B, M, Lp]: survives split_tensor_dict
        return batch

    def _refuse_unsupported(self) -> None:
        if is_peft_model(self.model):
            raise ValueError("CreditSDPOTrainer: PEFT models (peft_config / a PeftModel) are not supported yet: the "
                             "fused heads need the merged LM head. Train the full model.")
        if self.is_fsdp_enabled:
            raise ValueError("CreditSDPOTrainer: FSDP (`fsdp` / an FSDP accelerate config) is not supported: the "
                             "packed teacher scorer and the fused heads need full weights on every rank. Use DDP "
                             "(accelerate --multi_gpu) or DeepSpeed ZeRO-1/2.")
        if self.is_deepspeed_enabled:
            stage = self.accelerator.state.deepspeed_plugin.zero_stage
            if stage == 3:
                raise ValueError("CreditSDPOTrainer: DeepSpeed ZeRO-3 (`zero_stage: 3`) is not supported: the packed "
                                 "teacher scorer and the fused heads need full weights on every rank. Use ZeRO-1/2.")
        if self.use_teacher_server:
            raise ValueError("CreditSDPOTrainer: the vLLM teacher server (`use_teacher_server=True`) is not supported; "
                             "the shuffled teachers are scored locally.")
        head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        if getattr(head, "bias", None) is not None or getattr(self.model.config, "final_logit_softcapping", None):
            raise ValueError("CreditSDPOTrainer: LM heads with a bias or logit softcapping are not supported.")

    # -- student: hidden states through the wrapped model, fused heads --------------------------------------------
    def _student_hidden(self, model, inputs) -> torch.Tensor:
        """[B, T, d] final hidden states at the positions that predict the completion tokens (zeros where the
        packed path ran and completion_mask is 0; every consumer reads only completion_mask's positions)."""
        self.last_student_fallback = None
        if self.args.share_prompts:
            hidden = self._student_hidden_packed(model, inputs)
            if hidden is not None:
                self.last_student_path = "packed"
                return hidden
        self.last_student_path = "padded"
        reason = self.last_student_fallback
        if reason is not None and reason not in self._fallbacks_warned:
            self._fallbacks_warned.add(reason)
            warnings.warn(f"CreditSDPOTrainer: share_prompts=True but the student runs padded: {reason}",
                          stacklevel=2)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        model_inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False, "output_hidden_states": True}
        if "logits_to_keep" in self.model_kwarg_keys:
            model_inputs["logits_to_keep"] = 1  # the head runs on one position; we project the rows ourselves
        hidden = model(**model_inputs).hidden_states[-1]  # after the final norm
        length = inputs["completion_ids"].size(1)
        return hidden[:, -length - 1 : -1]

    def _student_hidden_packed(self, model, inputs) -> torch.Tensor | None:
        """`_student_hidden` from ONE forward over the prefix trie of the micro-batch's prompts + completions[:-1],
        or None (with the reason in last_student_fallback) where the packed path cannot reproduce the padded one.

        The forward goes through `model` as the trainer passes it (the DDP / DeepSpeed wrapper: its gradient sync
        and accelerate's autocast stay in force) with the trie's tokens as one [1, U] row and the trie's position ids;
        tree attention is switched on in the unwrapped module for that call only. RoPE sees relative positions, so
        TRL's left padding (positions offset by the pad count) and the trie (positions from 0) agree up to rounding.
        """
        unwrapped = self.accelerator.unwrap_model(model)
        if self.args.torch_compile or _compiled(model):
            self.last_student_fallback = "a torch.compile'd model (the tree attention switch is not traced)"
            return None
        pmask, comp, cmask = inputs["prompt_mask"].bool(), inputs["completion_ids"], inputs["completion_mask"].bool()
        num, length = comp.shape
        # the padded forward attends to exactly the masked-in tokens in order: packed needs them contiguous
        p_left = (pmask.int().diff(dim=1) >= 0).all()
        c_right = (cmask.int().diff(dim=1) <= 0).all()
        if not bool(p_left and c_right):
            self.last_student_fallback = "prompt_mask is not left-padded or completion_mask not right-padded"
            return None
        n_resp = cmask.sum(-1).cpu().numpy().astype(np.int64)
        n_ctx = pmask.sum(-1).cpu().numpy().astype(np.int64)
        items = [i for i in range(num) if n_resp[i] > 0]
        if not items or any(n_ctx[i] == 0 for i in items):
            self.last_student_fallback = "no completion has a token" if not items else "an empty prompt"
            return None
        pid, cid = inputs["prompt_ids"].cpu().numpy(), comp.cpu().numpy()
        pm = pmask.cpu().numpy()
        seqs = [np.concatenate([pid[i][pm[i]], cid[i, : n_resp[i] - 1]]).astype(np.int64) for i in items]
        max_len = max(int(s.size) for s in seqs)
        reason = packed_unsupported(unwrapped, max_len)
        if reason is not None:
            self.last_student_fallback = reason
            return None
        trie = build_prefix_trie(seqs)
        rows = trie.seq_rows.numpy()[pred_index(n_ctx[items], n_resp[items], trie.seq_ptr.numpy()[:-1])]
        device = comp.device
        state = TreeState(tree_attention_plan(trie, device=device, check_inputs=False), "auto", max_len)
        model_inputs = {"input_ids": trie.tokens.to(device)[None], "position_ids": trie.positions.to(device)[None],
                        "use_cache": False, "output_hidden_states": True}
        if "logits_to_keep" in self.model_kwarg_keys:
            model_inputs["logits_to_keep"] = 1  # the head runs on one row (it stays in the graph, as padded)
        with tree_attention_active(unwrapped, state):
            out = model(**model_inputs)
        layers = getattr(unwrapped.config, "num_hidden_layers", None)
        if state.calls == 0 or (layers is not None and state.calls != layers):
            raise RuntimeError(f"CreditSDPOTrainer: tree attention ran in {state.calls} of {layers} layers of "
                               f"{type(unwrapped).__name__}; set share_prompts=False.")
        packed = out.hidden_states[-1][0][torch.from_numpy(rows).to(device)]  # [N, d], (response, token) order
        hidden = packed.new_zeros((num, length, packed.size(-1)))
        hidden[cmask] = packed  # right-padded completions: cmask's row-major order is (response, token) order
        self.last_student_tokens = (int(trie.num_unique), int(trie.total_tokens))
        return hidden

    def _head_weight(self, model) -> torch.Tensor:
        return self.accelerator.unwrap_model(model).get_output_embeddings().weight

    # -- teacher --------------------------------------------------------------------------------------------------
    def _teacher_module(self):
        return self.accelerator.unwrap_model(self.teacher_model)

    def _contexts(self, inputs) -> tuple[list[list[int]], list[list[int]]]:
        """Aligned contexts (B lists) and shuffled ones (B * M lists, index i * M + m), unpadded."""
        length = inputs["completion_ids"].size(1)
        tid, tmask = inputs["teacher_input_ids"][:, :-length], inputs["teacher_attention_mask"][:, :-length]
        aligned = [_unpad(r, m) for r, m in zip(tid.cpu(), tmask.cpu())]
        pid, pmask = inputs["credit_partner_ids"].cpu(), inputs["credit_partner_mask"].cpu()
        shuffled = [_unpad(pid[i, m], pmask[i, m]) for i in range(pid.size(0)) for m in range(pid.size(1))]
        return aligned, shuffled

    def _credit_teacher(self) -> CreditTeacher:
        """The pipeline's CreditTeacher on the current teacher weights and settings (rebuilt when they change)."""
        args, module = self.args, self._teacher_module()
        key = (args.lam, args.num_partners, args.baseline, args.swap, self.temperature, args.scorer_max_tokens)
        if self._teacher is None or self._teacher.model is not module or self._teacher_key != key:
            # TRL divides the teacher's logits by the sampling temperature too (`_forward_logits`)
            self._teacher = CreditTeacher(
                module, self._tokenizer, method="credit" if args.num_partners > 0 else "sdpo", lam=args.lam,
                num_partners=max(1, args.num_partners), baseline=args.baseline, swap=args.swap,
                temperature=self.temperature, max_tokens=args.scorer_max_tokens,
            )
            self._teacher_key = key
        return self._teacher

    def _teacher_pairs(self, inputs, loss_mask) -> TeacherPairs:
        """TRL's aligned contexts and our shuffled ones as TeacherPairs: response i's aligned context is contexts[i],
        its m-th shuffled one contexts[B + i * M + m]; only responses with loss-mask tokens get pairs."""
        aligned_ctx, shuffled_ctx = self._contexts(inputs)
        comp = inputs["completion_ids"]
        num = comp.size(0)
        num_partners = inputs["credit_partner_ids"].size(1)
        lengths = inputs["completion_mask"].sum(-1).tolist()
        active = loss_mask.bool().any(-1).tolist()
        rows = [i for i in range(num) if lengths[i] > 0 and active[i]]
        return TeacherPairs(
            aligned_ctx + shuffled_ctx, [(i, i) for i in rows],
            [[(i, num + i * num_partners + m) for i in rows] for m in range(num_partners)],
            [comp[i, : lengths[i]].tolist() for i in range(num)], [i in rows for i in range(num)],
        )

    def _score_teacher(self, inputs, loss_mask: torch.Tensor, topk_ids: torch.Tensor | None):
        """Sampled-token mode: TeacherLogprobs [B, T]; top-k mode (topk_ids [B, T, k]): a TopkTeacher over the
        loss mask's tokens (row-major)."""
        start = time.perf_counter()
        with torch.no_grad(), self._get_teacher_context_for_self_distillation():
            if self.args.teacher_scoring == "packed":
                out = self._score_packed(inputs, loss_mask, topk_ids)
            else:
                out = self._score_padded(inputs, loss_mask, topk_ids)
        self.last_teacher_time_s = time.perf_counter() - start
        return out

    def _score_packed(self, inputs, loss_mask, topk_ids):
        teacher, pairs = self._credit_teacher(), self._teacher_pairs(inputs, loss_mask)
        comp = inputs["completion_ids"]
        device, length = comp.device, comp.size(1)
        if topk_ids is None:
            return teacher.score(pairs=pairs, width=length, device=device)
        lengths = [len(r) for r in pairs.responses_ids]
        topk = teacher.score_topk(ids=[topk_ids[i, :n] for i, n in enumerate(lengths)], pairs=pairs, device=device)
        # flat (response, token) rows -> [B, T, k] -> the loss mask's rows (tokens past a response stay 0)
        prefix = torch.arange(length, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        keep = loss_mask.bool()

        def at_keep(flat, lead=()):
            full = flat.new_zeros((*lead, *prefix.shape, *flat.shape[len(lead) + 1:]))
            full[(slice(None),) * len(lead) + (prefix,)] = flat
            return full[(slice(None),) * len(lead) + (keep,)]

        num_partners = topk.shuffled_logp.size(0)
        return TopkTeacher(at_keep(topk.logp), at_keep(topk.tail), at_keep(topk.shuffled_logp, (num_partners,)),
                           at_keep(topk.shuffled_tail, (num_partners,)), topk.row_mask.new_ones(int(keep.sum())), [],
                           None)

    def _score_padded(self, inputs, loss_mask, topk_ids):
        """TRL's teacher forward (full [B, T, V] logits), once for the aligned and once per shuffled context set."""
        comp, cmask = inputs["completion_ids"], inputs["completion_mask"]
        length = comp.size(1)
        batches = [(inputs["teacher_input_ids"], inputs["teacher_attention_mask"])]
        pid, pmask = inputs["credit_partner_ids"], inputs["credit_partner_mask"]
        for m in range(pid.size(1)):
            batches.append((torch.cat([pid[:, m], comp], dim=1), torch.cat([pmask[:, m], cmask], dim=1)))
        outs, tails = [], []
        for ids, mask in batches:
            logits = self._forward_logits(self.teacher_model, ids, mask, length)
            if topk_ids is None:
                outs.append(selective_log_softmax(logits, comp).float())
            else:
                logp = (torch.gather(logits, -1, topk_ids) - torch.logsumexp(logits, -1, keepdim=True)).float()
                outs.append(logp)
                tails.append(add_tail_bucket(logp)[..., -1])
            del logits
        shuffled = torch.stack(outs[1:]) if len(outs) > 1 else outs[0].new_zeros((0, *outs[0].shape))
        if topk_ids is None:
            return TeacherLogprobs(outs[0], shuffled, cmask.float(), loss_mask.bool().any(-1))
        keep = loss_mask.bool()
        shuffled_tail = torch.stack(tails[1:]) if len(tails) > 1 else tails[0].new_zeros((0, *tails[0].shape))
        return TopkTeacher(outs[0][keep], tails[0][keep], shuffled[:, keep], shuffled_tail[:, keep],
                           keep.new_ones(int(keep.sum())), [], None)

    # -- loss -----------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The CreditSDPOTrainer does not support returning outputs")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        hidden = self._student_hidden(model, inputs)  # [B, T, d]
        weight = self._head_weight(model).to(hidden.dtype)
        keep = completion_mask.bool()
        per_token_logps = hidden.new_zeros(completion_ids.shape, dtype=torch.float32)
        per_token_logps = per_token_logps.masked_scatter(
            keep, linear_logprob(hidden[keep], weight, completion_ids[keep], temperature=self.temperature)
        )
        w = self.args.distillation_weight
        loss = 0.0
        if w < 1.0:
            loss = (1 - w) * self._policy_loss_from_logps(inputs, per_token_logps)
        if w > 0.0:
            loss = loss + w * self._credit_distillation_loss(model, inputs, hidden, weight, per_token_logps)
        accumulation_scale = self.current_gradient_accumulation_steps if self.model.training else 1.0
        return loss / accumulation_scale

    def _policy_loss_from_logps(self, inputs, per_token_logps: torch.Tensor) -> torch.Tensor:
        """SDPOTrainer._compute_policy_loss on given per-token log-probs (the same clipped objective and reductions)."""
        completion_mask = inputs["completion_mask"]
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        log_ratio = per_token_logps - old
        if self.importance_sampling_level == "sequence":
            log_ratio = (log_ratio * completion_mask).sum(-1, keepdim=True) / completion_mask.sum(
                -1, keepdim=True
            ).clamp(min=1.0)
        coef_1 = torch.exp(log_ratio)
        coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
        masked = per_token_loss * completion_mask
        if self.loss_type == "grpo":
            loss = (masked.sum(-1) / completion_mask.sum(-1).clamp(min=1.0)).mean()
        elif self.loss_type in ("bnpo", "dapo"):
            loss = masked.sum() / completion_mask.sum().clamp(min=1.0)
        elif self.loss_type == "dr_grpo":
            loss = masked.sum() / (per_token_loss.size(0) * self.max_completion_length)
        else:
            raise ValueError(f"Unsupported loss_type: {self.loss_type}")
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["self_distillation/policy_loss"].append(
            self.accelerator.gather(loss.detach()).mean().item()
        )
        return loss

    def _credit_distillation_loss(self, model, inputs, hidden, weight, per_token_logps) -> torch.Tensor:
        args = self.args
        mode = "train" if model.training else "eval"
        completion_mask = inputs["completion_mask"]
        sd_mask = inputs.get("self_distillation_mask")
        loss_mask = completion_mask if sd_mask is None else completion_mask * sd_mask.unsqueeze(1)
        if loss_mask.sum() == 0:
            # every rank must join the same collectives: gather the metric here too (a rank whose shard has no
            # teacher signal would otherwise leave the others waiting in their gather)
            zero = per_token_logps.new_zeros(())
            self._log_self_distillation_metric(mode, self.accelerator.gather(zero).mean().item())
            if self.args.num_partners > 0 and self.args.distillation_mode == "sampled_token":
                self._metrics[mode]["credit/input_specific"].append(self.accelerator.gather(zero).mean().item())
            return per_token_logps.sum() * 0.0  # attached to the student graph: zero gradients, not none
        keep = loss_mask.bool()
        if args.distillation_mode == "sampled_token":
            scores = self._score_teacher(inputs, loss_mask, None)
            s = per_token_logps
            out = self._credit_teacher().rewards(scores, s.detach(), loss_mask.float())
            r = out.rewards
            if out.contrast is not None:
                self._log_contrast(mode, out.contrast, keep)
            self.last_token_rewards = r.detach()  # [B, T], 0 outside the loss mask
            per_token_loss = -r.detach() * s  # TRL: (s - a).detach() * s at lam = 0
        else:
            per_token_loss = self._topk_loss(inputs, hidden, weight, loss_mask, mode)
        old = inputs.get("old_per_token_logps")
        if args.distillation_is_clip is not None and old is not None:
            per_token_loss = apply_importance_sampling_clipping(per_token_loss, per_token_logps, old,
                                                                args.distillation_is_clip)
        loss = ((per_token_loss * loss_mask).sum(-1) / loss_mask.sum(-1).clamp(min=1.0)).mean()
        mean_distill = (per_token_loss * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
        self._log_self_distillation_metric(mode, self.accelerator.gather(mean_distill.detach()).mean().item())
        return loss

    def _topk_loss(self, inputs, hidden, weight, loss_mask, mode) -> torch.Tensor:
        """Per-token top-k divergence [B, T] between the student and the (contrastive) teacher buckets."""
        args = self.args
        k, add_tail = args.distillation_topk, args.distillation_add_tail
        num, length = loss_mask.shape
        keep = loss_mask.bool()
        top = linear_topk(hidden[keep], weight, k, temperature=self.temperature)
        ids = torch.zeros(num, length, k, dtype=torch.long, device=hidden.device)
        ids[keep] = top.ids
        teacher = self._score_teacher(inputs, loss_mask, ids)  # TopkTeacher over the kept tokens
        s_topk = top.logp  # [N, k]
        if add_tail:
            s_buckets = add_tail_bucket(s_topk)
        else:
            s_buckets = s_topk - torch.logsumexp(s_topk, dim=-1, keepdim=True)
        target = self._credit_teacher().topk_target(teacher, s_topk, s_buckets[..., -1] if add_tail else None,
                                                    add_tail=add_tail)
        t_buckets = torch.cat([target.topk_logp, target.tail_logp.unsqueeze(-1)], -1) if add_tail else target.topk_logp
        per_row = compute_divergence(s_buckets, t_buckets, args.distillation_alpha)
        return per_row.new_zeros(num, length).masked_scatter(keep, per_row)

    def _log_contrast(self, mode, contrast, keep) -> None:
        diff = contrast.sum() / keep.sum().clamp(min=1)  # mean (a - beta) over the rewarded tokens
        self._metrics[mode]["credit/input_specific"].append(self.accelerator.gather(diff.detach()).mean().item())
        self._metrics[mode]["credit/teacher_time_s"].append(self.last_teacher_time_s)
