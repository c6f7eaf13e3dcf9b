"""Learning-rate schedule: linear warmup, then half-cosine decay, counted in OPTIMIZER steps.

Counting in optimizer steps (not micro-batches) is what makes the peak reachable with gradient accumulation: with
`accumulate_grad_batches=k`, a warmup of W steps spans W*k micro-batches, and the lr of the W-th update is the peak.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lit_adapter.errors import LitAdapterError


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for the update with 0-based index `step`.

    Update n = step + 1 (1-based) uses n / W of the peak during warmup (n <= W, so update W is exactly at the peak),
    then min + (1 - min) * (1 + cos(pi * (n - W) / (T - W + 1))) / 2: the decay would reach `min_lr_ratio` one
    update after the last, so neither the first nor the last of the T updates is wasted at a zero lr.
    """
    n = step + 1
    if warmup_steps > 0 and n <= warmup_steps:
        return n / warmup_steps
    progress = min(1.0, (n - warmup_steps) / max(1, total_steps - warmup_steps + 1))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_warmup_steps(
    warmup_steps: Optional[int], warmup_epochs: Optional[float], steps_per_epoch: int, total_steps: int
) -> int:
    """Warmup length in optimizer steps, from a step count or a (fractional) number of epochs."""
    if warmup_steps is not None and warmup_epochs is not None:
        raise LitAdapterError("set either warmup_steps or warmup_epochs, not both")
    if warmup_epochs is not None:
        if warmup_epochs < 0:
            raise LitAdapterError(f"warmup_epochs={warmup_epochs} must be >= 0")
        warmup_steps = round(warmup_epochs * steps_per_epoch)
    warmup_steps = warmup_steps or 0
    if warmup_steps < 0:
        raise LitAdapterError(f"warmup_steps={warmup_steps} must be >= 0")
    return min(warmup_steps, total_steps)


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> LambdaLR:
    """A LambdaLR to be stepped once per optimizer step (Lightning's `interval: step`)."""
    if total_steps <= 0:
        raise LitAdapterError(f"the schedule needs a positive number of optimizer steps (got {total_steps})")
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, min_lr_ratio))


def schedule_for(
    optimizer: Optimizer, trainer: Any, warmup_steps: Optional[int], warmup_epochs: Optional[float], min_lr_ratio: float
) -> LambdaLR:
    """The warmup-cosine schedule over the trainer's whole run (warmup given in optimizer steps or in epochs)."""
    total = int(trainer.estimated_stepping_batches)
    steps_per_epoch = max(1, -(-trainer.num_training_batches // trainer.accumulate_grad_batches))
    if trainer.num_training_batches == float("inf"):
        steps_per_epoch = total
    warmup = resolve_warmup_steps(warmup_steps, warmup_epochs, steps_per_epoch, total)
    return warmup_cosine(optimizer, warmup, total, min_lr_ratio)



def apply_peak_lr(checkpoint: dict[str, Any], peak_lr: float) -> None:
    """Make a checkpoint about to be resumed use the peak learning rate configured now.

    Lightning restores the optimizer's and the scheduler's learning rates from the checkpoint, so a run resumed with
    a lower `learning_rate` (the advice after a non-finite stop) would silently go on at the old one. Here every
    param group's `initial_lr` and each scheduler's `base_lrs` become `peak_lr`, and the current learning rates keep
    their place in the schedule (scaled by the same factor); a checkpoint of the same peak is left as it is.
    """
    scale = 1.0
    for optimizer in checkpoint.get("optimizer_states", []):
        for group in optimizer.get("param_groups", []):
            old = group.get("initial_lr")
            if old and old != peak_lr:
                scale = peak_lr / old
                group["lr"] *= scale
                group["initial_lr"] = peak_lr
    if scale == 1.0:
        return
    for scheduler in checkpoint.get("lr_schedulers", []):
        if "base_lrs" in scheduler:
            scheduler["base_lrs"] = [peak_lr for _ in scheduler["base_lrs"]]
        if "_last_lr" in scheduler:
            scheduler["_last_lr"] = [lr * scale for lr in scheduler["_last_lr"]]
