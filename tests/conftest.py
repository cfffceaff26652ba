"""Shared fixtures: the default model, loaded once per test session (fetched by `make setup`)."""

import pytest

from engine.loader import LoadedModel, load
from engine.registry import DEFAULT_MODEL, fetch


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    return load(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def default_gguf():
    return fetch(DEFAULT_MODEL)
