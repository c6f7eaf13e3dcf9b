"""Prototype optimisations of our model, applied inside the benchmark process only (flag `--proto NAME,...`)."""

from __future__ import annotations

from typing import Any, Callable

PROTOS: dict[str, str] = {}


def apply_protos(model: Any, names: list[str]) -> Callable:
    """Apply the named prototypes to `model` (an AdapterModel); returns forward(input_ids) -> logits."""
    return model
