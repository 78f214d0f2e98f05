"""Fixtures shared by the test modules."""

import pytest

from tests.utils import TEST_TOKENIZER_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, saved like any local model."""
    from credit.models import save_random_llama

    return save_random_llama(str(tmp_path_factory.mktemp("tiny_llama")), tokenizer_dir=TEST_TOKENIZER_DIR)
