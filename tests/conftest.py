"""Fixtures shared by the test modules."""

import pytest
import torch

from tests.utils import TEST_TOKENIZER_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, saved like any local model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from credit.models import embedded_gguf

    path = tmp_path_factory.mktemp("tiny_llama")
    if TEST_TOKENIZER_DIR:
        tok = AutoTokenizer.from_pretrained(TEST_TOKENIZER_DIR)
    else:
        directory, name = embedded_gguf()
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
