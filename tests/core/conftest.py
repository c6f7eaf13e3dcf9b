"""Core tests run torch on one thread: the models are tiny, and on a shared machine threads mostly wait."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Core tests run torch on one thread (see `one_torch_thread`)."""
