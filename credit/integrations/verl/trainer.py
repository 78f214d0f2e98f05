r"""``CreditPPOTrainer``: verl's synchronous v1 PPO trainer plus CREDIT's teacher contexts (trainer_mode "credit").

Where it departs from ``PPOTrainerSync`` (verl 0.9.1):

* After the rollouts, rewards, old and ref log-probs, and before the advantages (``_compute_advantage``), the driver
  reads the global batch from TransferQueue, builds the feedback and partner contexts over it
  (``contexts.build_credit_contexts``; one seed, no gather: the driver sees every group), writes the teacher rows
  under fresh keys, has them scored by a worker group, and writes ``credit_teacher_logprobs`` (a),
  ``credit_shuffled_logprobs`` (b) and ``credit_teacher_mask`` back to the batch. The actor's
  ``update_actor`` then runs verl's ``distillation_ppo_loss`` with our registered ``"credit"`` loss.
* The teacher: ``teacher="frozen"`` -> the ref worker group (``compute_ref_log_prob``: the initial weights; verl
  builds it when ``actor_rollout_ref.actor.use_kl_loss=true``: set ``kl_loss_coef=0`` if no KL is wanted);
  ``teacher="live"`` -> the actor (``compute_log_prob``: the current weights). An EMA teacher is not in verl: it
  would need a third FSDP model on the actor's workers updated after each optimizer step
  (p_T <- (1 - rate) p_T + rate p_S, shard by shard: both are sharded the same way) and a worker method that scores
  with it; verl 0.9.1 has neither, so CreditLossConfig rejects ``teacher="ema"``.
* verl's own distillation path would launch teacher inference servers (a teacher pool and, in the agent loop, a
  teacher log-prob request per rollout on the student's own context). CREDIT's teacher needs other contexts, so
  this trainer asks for no teacher pool (``use_teacher_policy = False``) and ``CreditAgentLoopManager`` (set
  ``actor_rollout_ref.rollout.agent.agent_loop_manager_class``) runs the agent loop with distillation off, while
  the actor worker keeps ``distillation.enabled=true`` and so trains with the distillation loss.

Not run end to end here: that needs Ray, a GPU and vLLM/SGLang (see examples/verl/README.md).
"""

from __future__ import annotations

import logging

import ray
import torch
import transfer_queue as tq
from omegaconf import DictConfig, OmegaConf, open_dict
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ, AgentLoopWorkerTQ
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.debug import marked_timer
from verl.workers.utils.padding import response_from_nested

from credit.integrations.verl.contexts import (
    CreditContexts,
    assemble_credit_fields,
    build_credit_contexts,
    zero_credit_fields,
)
from credit.integrations.verl.loss import CreditLossConfig

__all__ = ["CreditAgentLoopManager", "CreditPPOTrainer", "credit_loss_config", "without_distillation"]

logger = logging.getLogger(__name__)

TRAINER_NAME = "credit"
TEACHER_PARTITION = "credit_teacher"
_STUDENT_FIELDS = ["responses", "response_mask", "uid", "rm_scores", "raw_prompt"]


def _as_list(x) -> list:
    """A TensorDict non-tensor column (NonTensorStack, list or array) as a Python list."""
    return x.tolist() if hasattr(x, "tolist") else list(x)


def without_distillation(config: DictConfig) -> DictConfig:
    """A copy of the run's config with ``distillation.enabled=false`` (the agent loop and resource pools see it)."""
    cfg = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
    if cfg.get("distillation") is not None:
        with open_dict(cfg):
            cfg.distillation.enabled = False
    return cfg


def credit_loss_config(config: DictConfig) -> CreditLossConfig:
    """The run's CreditLossConfig (``distillation.distillation_loss``), with a clear error when it is not one."""
    dist = config.get("distillation")
    if dist is None or not dist.get("enabled", False):
        raise ValueError("CreditPPOTrainer: set distillation.enabled=true (the actor trains with the CREDIT loss)")
    cfg = omega_conf_to_dataclass(dist.distillation_loss)
    if not isinstance(cfg, CreditLossConfig):
        raise ValueError(
            "CreditPPOTrainer: distillation.distillation_loss must be a CreditLossConfig; set "
            "distillation.distillation_loss._target_=credit.integrations.verl.CreditLossConfig and loss_mode=credit; "
            f"got {type(cfg).__name__} with loss_mode={getattr(cfg, 'loss_mode', None)!r}"
        )
    return cfg


@ray.remote
class CreditAgentLoopWorker(AgentLoopWorkerTQ.__ray_actor_class__):
    """verl's TransferQueue agent-loop worker with distillation off: no teacher request per rollout."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(without_distillation(config), *args, **kwargs)


class CreditAgentLoopManager(AgentLoopManagerTQ):
    """``actor_rollout_ref.rollout.agent.agent_loop_manager_class=credit.integrations.verl.trainer.CreditAgentLoopManager``."""

    def __init__(self, *args, **kwargs):
        self.agent_loop_workers_class = CreditAgentLoopWorker
        super(AgentLoopManagerTQ, self).__init__(*args, **kwargs)  # skip TQ's __init__: it resets the worker class


@register_trainer(TRAINER_NAME)
class CreditPPOTrainer(PPOTrainerSync):
    """PPOTrainerSync plus CREDIT's driver-side teacher contexts (see the module docstring)."""

    def __init__(self, config: DictConfig):
        super().__init__(config)
        self.credit_config = credit_loss_config(config)
        self.use_teacher_policy = False  # the ref / actor worker group is the teacher: no teacher servers
        if self.credit_config.teacher == "frozen" and not self.use_reference_policy:
            raise ValueError(
                "CreditPPOTrainer: teacher='frozen' scores with the ref worker group, which verl builds only with "
                "actor_rollout_ref.actor.use_kl_loss=true (set kl_loss_coef=0 for no KL term); or use teacher='live'"
            )

    def _init_resource_pool_mgr(self):
        config = self.config
        self.config = without_distillation(config)  # no teacher pool
        try:
            super()._init_resource_pool_mgr()
        finally:
            self.config = config

    def _setup(self):
        super()._setup()
        # verl sets this only with its teacher servers; _update_actor reads the loss settings from it
        self.distillation_config = omega_conf_to_dataclass(self.config.distillation)

    def _compute_advantage(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        with marked_timer("credit_teacher", getattr(self, "timing_raw", {}), color="purple"):
            self._compute_credit_fields(batch, metrics)
        return super()._compute_advantage(batch, metrics)

    # ------------------------------------------------------------------------------------------------------------
    def _teacher_wg(self):
        if self.credit_config.teacher == "frozen" and not getattr(self, "ref_in_actor", False):
            return self.ref_policy_wg, "compute_ref_log_prob"
        return self.actor_rollout_wg, "compute_log_prob"

    def _dp_multiple(self) -> int:
        wg, _ = self._teacher_wg()
        role = "ref" if wg is getattr(self, "ref_policy_wg", None) else "actor"
        info = getattr(wg, "_dispatch_info", None)
        if info is None:
            return 1
        if role not in info:
            info[role] = wg._query_dispatch_info(role)
        return max(info[role]) + 1

    def _build_contexts(self, data: TensorDict) -> CreditContexts:
        cfg = self.credit_config
        responses = [r.tolist() for r in data["responses"].unbind(0)]
        prompts = _as_list(data["raw_prompt"]) if "raw_prompt" in data.keys() else None
        if prompts is None:
            raise KeyError("CreditPPOTrainer: the batch has no 'raw_prompt' (the prompt messages); keep the "
                           "dataset's raw_prompt field (data.return_raw_chat=true)")
        scores = data["rm_scores"]
        scores = scores.to_padded_tensor(0.0) if scores.is_nested else scores
        successes = (scores.sum(-1) >= cfg.success_threshold).tolist()
        feedback = _as_list(data[cfg.feedback_key]) if cfg.feedback_key in data.keys() else None
        return build_credit_contexts(
            self.tokenizer, prompts, _as_list(data["uid"]), responses, successes, feedback,
            num_partners=cfg.num_partners if cfg.lam > 0 else 0, swap=cfg.swap,
            seed=cfg.seed, step=int(getattr(self, "global_steps", 0)),
        )

    def _score_rows(self, contexts: CreditContexts, partition_id: str) -> list[torch.Tensor]:
        rows = contexts.teacher_batch(pad_to_multiple=self._dp_multiple())
        step = int(getattr(self, "global_steps", 0))
        keys = [f"credit_teacher_{step}_{r}" for r in range(rows.batch_size[0])]
        lens = [(int(p.numel()), int(r.numel()))
                for p, r in zip(rows["prompts"].unbind(0), rows["responses"].unbind(0))]
        tags = [{"prompt_len": p, "response_len": r, "seq_len": p + r} for p, r in lens]
        meta = tq.kv_batch_put(keys=keys, partition_id=partition_id, fields=rows, tags=tags)
        meta.extra_info.update({"calculate_entropy": False, "compute_loss": False,
                                "temperature": self.config.actor_rollout_ref.rollout.temperature})
        if self.credit_config.teacher == "frozen" and getattr(self, "ref_in_actor", False):
            meta.extra_info["no_lora_adapter"] = True  # LoRA: the frozen teacher is the actor with adapters off
        wg, method = self._teacher_wg()
        getattr(wg, method)(meta)
        out = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=["log_probs", "response_mask"])
        tq.kv_clear(keys=keys, partition_id=partition_id)
        return list(response_from_nested(out["log_probs"], out["response_mask"]).unbind(0))

    def _compute_credit_fields(self, batch: KVBatchMeta, metrics: dict) -> None:
        """Build, score and write the CREDIT fields of the global batch (see the module docstring).

        verl's padding samples (``is_padding`` tags, added to make the batch divisible by the data-parallel size)
        copy a real prompt under their own uid: they are left out of feedback and partners, and get zero fields.
        """
        cfg = self.credit_config
        tags = batch.tags or [{} for _ in batch.keys]
        real = [k for k, t in zip(batch.keys, tags) if not (t or {}).get("is_padding", False)]
        pad = [k for k, t in zip(batch.keys, tags) if (t or {}).get("is_padding", False)]
        data = tq.kv_batch_get(keys=real, partition_id=batch.partition_id, select_fields=_STUDENT_FIELDS)
        if cfg.feedback_key:
            try:
                data.update(tq.kv_batch_get(keys=real, partition_id=batch.partition_id,
                                            select_fields=[cfg.feedback_key]))
            except (KeyError, ValueError, RuntimeError):
                pass  # the reward function returns no text feedback: demonstrations only
        contexts = self._build_contexts(data)
        # a partition of their own: the replay buffer samples "train" and must never see the teacher rows
        row_lp = self._score_rows(contexts, TEACHER_PARTITION) if contexts.num_rows else []
        fields = assemble_credit_fields(contexts, row_lp, list(data["response_mask"].unbind(0)))
        tq.kv_batch_put(keys=real, partition_id=batch.partition_id, fields=TensorDict(fields, batch_size=[len(real)]))
        if pad:
            resp = tq.kv_batch_get(keys=pad, partition_id=batch.partition_id, select_fields=["responses"])
            zeros = zero_credit_fields([int(r.numel()) for r in resp["responses"].unbind(0)], contexts.num_partners)
            tq.kv_batch_put(keys=pad, partition_id=batch.partition_id, fields=TensorDict(zeros, batch_size=[len(pad)]))
        metrics["credit/feedback_frac"] = float(contexts.feedback_mask.float().mean())
        metrics["credit/teacher_rows"] = contexts.num_rows
