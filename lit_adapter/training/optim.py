"""AdamW for adapter parameters: the official weight-decay split, and eagerly created state."""

from __future__ import annotations

import torch


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
