"""Fixtures of the data tests: the stories260K tokenizer, a private cache folder, small generated images."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lit_adapter.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tok_path(assets: Path) -> Path:
    return assets / "stories260K" / "tok512.model"


@pytest.fixture(scope="session")
def tokenizer(tok_path: Path) -> Tokenizer:
    return Tokenizer(tok_path)


def write_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path
