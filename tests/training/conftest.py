"""Fixtures of the training tests: a private cache, a small instruction file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.helpers import write_instructions


@pytest.fixture(scope="session")
def instructions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_instructions(tmp_path_factory.mktemp("instructions") / "records.json")
