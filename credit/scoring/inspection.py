"""Model inspection: whether the tree backend reproduces a model exactly, its attention window and device."""

from __future__ import annotations

import torch

# Families whose attention goes through transformers' AttentionInterface with plain softmax attention, rotary
# positions from position_ids and an unscaled linear LM head: exactly what the tree path reproduces.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Config fields that change the logits or the attention scores in ways the tree path does not reproduce.
_UNSUPPORTED_CONFIG = ("final_logit_softcapping", "attn_logit_softcapping", "logit_scale", "logits_scaling")


def tree_unsupported(model) -> str | None:
    """Why the tree path cannot score `model` exactly, or None."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of the supported families {SUPPORTED_MODEL_TYPES}"
    for name in _UNSUPPORTED_CONFIG:
        val = getattr(config, name, None)
        if val is not None and not (name in ("logit_scale", "logits_scaling") and val == 1):
            return f"config.{name} = {val} (logit scaling/softcapping) is not reproduced by the tree path"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return f"the LM head must be a bias-free nn.Linear; got {type(head).__name__}"
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or base is model:
        return "no base model (model.model) to take the final hidden states from"
    if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
        return "the model cannot switch its attention implementation"
    return None


def sliding_window(config) -> int | None:
    """The attention window some layer applies, or None."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def device_of(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
