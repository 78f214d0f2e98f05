"""Fixtures of the verl tests. They run in the verl virtualenv with --confcutdir=tests/verl (.ci/verl.sh): verl's
wheel installs a top-level ``tests`` package that shadows ours there, so tests/conftest.py is not loaded."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_verl():
    torch.manual_seed(0)
    yield
