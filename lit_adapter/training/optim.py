"""What trains and how: trainable patterns, the official AdamW weight-decay split, eagerly created AdamW state."""

from __future__ import annotations

import fnmatch
from typing import Optional

import torch

from lit_adapter.errors import LitAdapterError


def apply_trainable_patterns(model: torch.nn.Module, patterns: Optional[list[str]]) -> None:
    """Train only the adapter parameters whose names match one of the glob `patterns` (None: all of them); the
    others stay frozen at their initial values."""
    if patterns is None:
        return
    names = model.adapter_names
    trainable = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not trainable:
        raise LitAdapterError(f"trainable={patterns} matches none of the adapter parameters (e.g. {names[:3]})")
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(name in trainable)


def decay_groups(named_parameters, weight_decay: float) -> list[dict]:
    """Two AdamW groups as in the official code (timm's add_weight_decay): no decay for biases and 1-D parameters
    (norms, scales), `weight_decay` for the rest (prompts, gates, projections, LoRA)."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def initialise_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """Create AdamW's per-parameter state up front, as its first step would (step 0, zero moments).

    With per-step routing a parameter may have no state for a while; FSDP cannot gather an optimizer state in which
    some parameters of a unit have state and others do not, so every checkpoint would depend on both groups having
    stepped. The values are exactly those AdamW creates lazily, so the updates are unchanged.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
