"""Fixtures of the training tests: a private cache, a small instruction file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.helpers import write_instructions


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Demo data and tokenised caches go to a per-session temporary folder, never to ~/.cache."""
    root = tmp_path_factory.getbasetemp() / "lit-adapter-cache"
    monkeypatch.setenv("LIT_ADAPTER_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def instructions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_instructions(tmp_path_factory.mktemp("instructions") / "records.json")
