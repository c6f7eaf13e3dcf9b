"""Fixtures for generation tests: stories260K with adapters whose gates are open (non-zero), and small images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_adapter.adapters import AdapterConfig, AdapterModel, attach_adapters
from lit_adapter.adapters.visual import TINY_CLIP_MODEL, VisualConfig
from lit_adapter.checkpoint import tokenizer_path
from lit_adapter.inference.engine import Engine
from lit_adapter.model import LLaMA
from lit_adapter.prompts import get_prompt_style
from lit_adapter.tokenizer import Tokenizer

TINY_VISUAL = dict(clip_model=TINY_CLIP_MODEL, clip_pretrained=None, visual_len=4, n_blocks=1, block_heads=2)


def open_gates(model: AdapterModel, seed: int = 0) -> AdapterModel:
    """Give every adapter parameter a non-trivial value, so the adapter really changes the model's output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.adapter_parameters().items():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("gate"):
                param.copy_(0.5 + 0.3 * noise)
            elif name.endswith(".scale") or name.endswith("norm.weight"):
                param.copy_(1 + 0.05 * noise)
            elif ".bias" in name or "lora_l2" in name:
                param.copy_(0.05 * noise)
            elif name.endswith(".prompt") or "lora_l1" in name:  # deterministic, unlike their random init
                param.copy_(noise * (1.0 if name.endswith(".prompt") else 0.1))
    return model


def text_adapter(base: LLaMA, **overrides) -> AdapterModel:
    config = AdapterConfig.v2(adapter_len=5, adapter_layers=4, **overrides)
    return open_gates(attach_adapters(base, config).eval())


def visual_adapter(base: LLaMA) -> AdapterModel:
    torch.manual_seed(0)
    config = AdapterConfig.v2(adapter_len=5, adapter_layers=4, visual=VisualConfig(**TINY_VISUAL))
    return open_gates(attach_adapters(base, config).eval())


def engine_for(checkpoint_dir: Path, model, style: str = "alpaca") -> Engine:
    """An Engine over an in-memory model (an AdapterModel or a bare LLaMA)."""
    tokenizer = Tokenizer(tokenizer_path(checkpoint_dir))
    if isinstance(model, AdapterModel):
        return Engine(model.llama, tokenizer, get_prompt_style(style), model)
    return Engine(model, tokenizer, get_prompt_style(style))


@pytest.fixture
def tokenizer(stories260k_dir: Path) -> Tokenizer:
    return Tokenizer(tokenizer_path(stories260k_dir))


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Generation tests run torch on one thread (see `one_torch_thread`)."""
