"""Rollout samplers: transformers `generate` everywhere, a colocated vLLM engine on CUDA when it is installed.

    sampler = make_sampler(cfg, student, tokenizer)      # --rollout auto | hf | vllm
    sampler.sync_weights(student)                        # before every rollout / evaluation
    responses = sampler.sample(prompts, G, greedy=False, seed=step_seed)   # [P * G] token-id lists, prompt-major

Both samplers return each response's token ids cut after its first stop token (the model's end-of-turn / eos
ids, kept in the response), so the trainer, the environment and teacher scoring see the same thing whichever
one ran. `HFSampler` is the trainer's original `generate`, unchanged: same seed, same tokens.

`VLLMSampler` follows the on-policy RL trainers that colocate vLLM with the policy on one GPU (TRL's
`vllm_mode="colocate"`, verl's hybrid engine): the engine is built once from the student's model directory,
and before each rollout the student's current parameters are pushed into the engine's model with its
`load_weights` (names as in the transformers checkpoint; vLLM fuses q/k/v and gate/up itself), then the
prefix cache is dropped, since its KV blocks were computed with the old weights. The engine runs in this
process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` unless set), so the push passes tensors by reference: a
device-to-device copy, no serialisation.

Sampling parameters are the same in both: temperature and top_p from the config, and the top_k / min_p /
repetition_penalty that transformers takes from the model's generation config (top_k=50 when the model sets
none: transformers' global default, which vLLM does not apply by itself), so switching sampler does not
change the distribution the policy gradient assumes. Each prompt gets its own vLLM seed derived from the
step's seed, so a resumed run asks for the same samples; vLLM documents seeded sampling as reproducible for
the same engine and inputs, not bit-exact across versions or GPUs.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

from credit.config import ROLLOUTS


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, L] ids and attention mask of `seqs` padded on the left to the longest (L), on `device`."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def stop_ids(model, tokenizer) -> set[int]:
    """Token ids that end a response: the generation config's eos id(s) (end-of-turn for chat models) and the
    tokenizer's eos."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def cut_at_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """`tokens` up to and including the first stop token (all of them when there is none)."""
    cut = next((k + 1 for k, t in enumerate(tokens) if t in stops), len(tokens))
    return tokens[:cut]


class Sampler(Protocol):
    """What the trainer needs from a rollout backend."""

    name: str  # "hf" or "vllm": recorded in the run's summary

    def sample(self, prompts: list[list[int]], num_samples: int, *, greedy: bool,
               seed: int | None = None) -> list[list[int]]:
        """num_samples responses per prompt, prompt-major ([p0 s0, p0 s1, ..., p1 s0, ...]), each cut after its
        first stop token. greedy: argmax decoding (the config's temperature/top_p are ignored). seed: the
        step's sampling seed; the same seed and weights give the same responses."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the sampler generate with `model`'s current weights."""
        ...


# ---------------------------------------------------------------------------------------------
# transformers generate
# ---------------------------------------------------------------------------------------------


class HFSampler:
    """transformers `generate` on the live student: what the trainer always did, token for token."""

    name = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer, cfg) -> None:
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to copy: generate runs on the model object itself, so it only has to be the right one."""
        self.model = model

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], num_samples: int, *, greedy: bool,
               seed: int | None = None) -> list[list[int]]:
        """See `Sampler.sample`. seed seeds torch's global generator, which generate draws from."""
        _check_sample_args(prompts, num_samples)
        model, cfg = self.model, self.cfg
        device = next(model.parameters()).device
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id, device)
        was_training = model.training
        model.eval()
        if seed is not None:
            torch.manual_seed(seed)
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=cfg.temperature,
                                                             top_p=cfg.top_p)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                             num_return_sequences=num_samples, pad_token_id=self.tokenizer.pad_token_id, **sampling)
        model.train(was_training)
        stops = stop_ids(model, self.tokenizer)
        # one host sync for the whole batch; rows that stopped early are padded after their stop token
        return [cut_at_stop(row, stops) for row in out[:, ids.shape[1]:].tolist()]


# ---------------------------------------------------------------------------------------------
# vLLM
# ---------------------------------------------------------------------------------------------


class VLLMSampler:
    """A vLLM engine colocated with the student on one GPU; the student's weights are pushed in before each
    rollout (`sync_weights`)."""

    name = "vllm"

    def __init__(self, model: torch.nn.Module, tokenizer, cfg, *, vllm=None) -> None:
        """Build the engine from the student's model directory (the one it was loaded from).

        vllm: the imported module (default: import it); tests pass a fake.
        """
        if vllm is None:
            import vllm
        path = getattr(model, "name_or_path", "")
        if not path:
            raise ValueError("--rollout vllm: the student has no model directory to build the vLLM engine from "
                             "(load it with from_pretrained, or use --rollout hf)")
        self.vllm, self.cfg = vllm, cfg
        self.stops = stop_ids(model, tokenizer)
        self.extras = _generation_config_extras(model)
        # In-process engine: the driver worker's model is then an attribute away and sync_weights hands it
        # the student's tensors without pickling them to an engine subprocess. Must be set before LLM().
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.llm = vllm.LLM(model=path, dtype=dtype, gpu_memory_utilization=cfg.vllm_gpu_memory,
                            enable_prefix_caching=True, seed=cfg.seed)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy every parameter of `model` (the student) into the engine, then drop the prefix cache."""
        weights = [(name, p.detach()) for name, p in model.named_parameters()]
        _load_weights(self.llm, weights)
        if hasattr(self.llm, "reset_prefix_cache"):  # cached KV blocks were computed with the old weights
            self.llm.reset_prefix_cache()

    def sample(self, prompts: list[list[int]], num_samples: int, *, greedy: bool,
               seed: int | None = None) -> list[list[int]]:
        """See `Sampler.sample`. Prompt i asks for n = num_samples samples with seed base + i * num_samples
        (vLLM seeds the j-th of n with seed + j), base drawn from `seed`: distinct seeds within a step."""
        _check_sample_args(prompts, num_samples)
        cfg, vllm = self.cfg, self.vllm
        common = dict(n=num_samples, max_tokens=cfg.max_new_tokens, stop_token_ids=sorted(self.stops),
                      detokenize=False)  # the trainer decodes what it needs
        if greedy:
            params = vllm.SamplingParams(temperature=0.0, **common)  # one for all prompts
        else:
            base = None if seed is None else int(torch.randint(0, 2**31 - 2**24, (1,),
                                                               generator=torch.Generator().manual_seed(seed)))
            params = [vllm.SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, **self.extras, **common,
                                          seed=None if base is None else base + i * num_samples)
                      for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompts)} prompts")
        responses = []
        for out in outputs:  # LLM.generate returns results in the order of the prompts
            completions = sorted(out.outputs, key=lambda c: c.index)
            if len(completions) != num_samples:
                raise RuntimeError(f"vLLM returned {len(completions)} samples for a prompt, asked for {num_samples}")
            # vLLM already stops at a stop id and keeps it in token_ids; the cut makes that explicit
            responses.extend(cut_at_stop(list(c.token_ids), self.stops) for c in completions)
        return responses


def _generation_config_extras(model) -> dict:
    """The sampling settings transformers' generate takes from the model's generation config (and its global
    top_k=50 default), for vLLM, which ignores them when given explicit SamplingParams."""
    gen = model.generation_config
    top_k = getattr(gen, "top_k", None)
    extras = {"top_k": 50 if top_k is None else (top_k if top_k > 0 else -1)}  # -1: off, in every vLLM version
    if getattr(gen, "min_p", None):
        extras["min_p"] = gen.min_p
    if getattr(gen, "repetition_penalty", None) not in (None, 1.0):
        extras["repetition_penalty"] = gen.repetition_penalty
    return extras


def _driver_model(llm):
    """The engine's nn.Module when the engine runs in this process (vLLM V0, or V1 without multiprocessing),
    else None. The worker is reached directly or through its wrapper's `.worker`, depending on the version."""
    worker = getattr(getattr(getattr(llm, "llm_engine", None), "model_executor", None), "driver_worker", None)
    for w in (worker, getattr(worker, "worker", None)):
        model = getattr(getattr(w, "model_runner", None), "model", None)
        if model is not None and hasattr(model, "load_weights"):
            return model
    return None


def _load_into_worker(worker, weights):
    """Run by `collective_rpc` on each vLLM worker (module level, so it pickles to engine subprocesses)."""
    worker.model_runner.model.load_weights(weights=weights)


def _load_into_model(model, weights):
    """Run by `apply_model` on each vLLM worker's model."""
    model.load_weights(weights=weights)


def _load_weights(llm, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Hand (name, tensor) pairs to the engine model's `load_weights`: directly when the engine is in this
    process, else through `collective_rpc` (vLLM >= 0.8) or `apply_model`, which send the tensors to the
    engine's workers (slower: serialised)."""
    model = _driver_model(llm)
    if model is not None:
        model.load_weights(weights=weights)
    elif hasattr(llm, "collective_rpc"):
        llm.collective_rpc(_load_into_worker, args=(weights,))
    elif hasattr(llm, "apply_model"):
        from functools import partial

        llm.apply_model(partial(_load_into_model, weights=weights))
    else:
        raise RuntimeError("--rollout vllm: this vLLM version exposes neither the engine's model nor "
                           "collective_rpc/apply_model, so the student's weights cannot be synced; use --rollout hf")


def _check_sample_args(prompts, num_samples) -> None:
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"sample: num_samples must be an int >= 1, got {num_samples!r}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample: prompts must be a non-empty list of non-empty token-id lists")


# ---------------------------------------------------------------------------------------------
# choice
# ---------------------------------------------------------------------------------------------


def _import_vllm():
    """(module, None) or (None, why it cannot be used)."""
    try:
        import vllm
    except ImportError as e:
        return None, f"vllm is not installed ({e})"
    except Exception as e:  # noqa: BLE001 - a broken install (CUDA / torch mismatch) fails in many ways
        return None, f"vllm is installed but fails to import ({type(e).__name__}: {e})"
    return vllm, None


def resolve_rollout(rollout: str, device: torch.device):
    """('hf' | 'vllm', the vllm module or None) for --rollout on `device`.

    auto: vllm when it imports and the device is CUDA, else hf (vllm is not even imported off CUDA).
    vllm: a ValueError naming --rollout when the device is not CUDA or vllm cannot be imported.
    """
    if rollout not in ROLLOUTS:
        raise ValueError(f"--rollout must be one of {ROLLOUTS}, got {rollout!r}")
    if rollout == "hf":
        return "hf", None
    on_cuda = torch.device(device).type == "cuda"
    if not on_cuda:
        if rollout == "vllm":
            raise ValueError(f"--rollout vllm needs a CUDA device, the student is on {device}; "
                             "use --rollout hf (or auto)")
        return "hf", None
    module, why = _import_vllm()
    if module is None:
        if rollout == "vllm":
            raise ValueError(f"--rollout vllm: {why}; pip install vllm, or use --rollout hf (or auto)")
        return "hf", None
    return "vllm", module


def make_sampler(cfg, model: torch.nn.Module, tokenizer) -> Sampler:
    """The sampler for cfg.rollout and the device `model` is on (see `resolve_rollout`)."""
    kind, module = resolve_rollout(cfg.rollout, next(model.parameters()).device)
    if kind == "vllm":
        return VLLMSampler(model, tokenizer, cfg, vllm=module)
    return HFSampler(model, tokenizer, cfg)
