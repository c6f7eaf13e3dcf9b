"""Mixed dtypes in one model: a frozen base in bf16 (or float16) with float32 trainable parameters."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def trainable_to_float32(module: torch.nn.Module) -> None:
    """Trainable weights taken from the base (e.g. trained norms) come in the frozen dtype: make them float32."""
    for param in module.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
