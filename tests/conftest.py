"""Shared fixtures: the default model, loaded once per test session (fetched by `make setup`)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `tradeoff` command does (tui/__init__.py): set before torch loads

import pytest  # noqa: E402

from engine.loader import LoadedModel, load  # noqa: E402
from engine.registry import DEFAULT_MODEL, fetch  # noqa: E402


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    return load(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def default_gguf():
    return fetch(DEFAULT_MODEL)
