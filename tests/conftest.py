"""Shared fixtures: asset lookup (skip locally, fail in CI), the stories260K checkpoint converted once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lit_adapter.checkpoint import load_model
from lit_adapter.config import ModelConfig
from lit_adapter.model import LLaMA


def _assets_root() -> Path:
    root = os.environ.get("LIT_ADAPTER_ASSETS")
    required = os.environ.get("LIT_ADAPTER_REQUIRE_ASSETS") == "1"
    if not root or not Path(root).is_dir():
        message = f"test assets not found (LIT_ADAPTER_ASSETS={root!r})"
        if required:
            pytest.fail(message + " but LIT_ADAPTER_REQUIRE_ASSETS=1")
        pytest.skip(message)
    return Path(root)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Demo data and tokenised caches go to a per-session temporary folder, never to ~/.cache."""
    root = tmp_path_factory.getbasetemp() / "lit-adapter-cache"
    monkeypatch.setenv("LIT_ADAPTER_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def assets() -> Path:
    """The shared assets folder (see its README): stories260K, Alpaca records, ScienceQA sample."""
    return _assets_root()


@pytest.fixture(scope="session")
def stories260k_dir(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K converted into a checkpoint folder, once per test session."""
    from lit_adapter.convert import convert

    out = tmp_path_factory.mktemp("stories260K")
    convert(assets / "stories260K" / "stories260K.bin", out, tokenizer=assets / "stories260K" / "tok512.model")
    return out


@pytest.fixture
def stories260k(stories260k_dir: Path) -> LLaMA:
    """A fresh fp32 stories260K model (each test gets its own, so adapters attached to it do not leak)."""
    return load_model(stories260k_dir)


@pytest.fixture
def tiny_model() -> LLaMA:
    torch.manual_seed(0)
    model = LLaMA(ModelConfig.from_name("tiny-gqa"))
    model.reset_parameters()
    return model.eval()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the test (the folders of tiny models use it): their matrices are tiny, and on a
    shared machine extra threads mostly wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def instructions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small instruction file the training and joint-data tests train on."""
    from tests.training.helpers import write_instructions

    return write_instructions(tmp_path_factory.mktemp("instructions") / "records.json")
