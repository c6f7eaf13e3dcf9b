"""Fixtures of the data tests: the stories260K tokenizer, a small instruction file, small generated images."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_adapter.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tok_path(assets: Path) -> Path:
    return assets / "stories260K" / "tok512.model"


@pytest.fixture(scope="session")
def tokenizer(tok_path: Path) -> Tokenizer:
    return Tokenizer(tok_path)
