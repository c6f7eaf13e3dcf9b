"""What a step measures: the NaN guard, and the validation loss (token-weighted over whole validation sets, per
source, reduced over all processes)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from lit_adapter.data.batch import SOURCES
from lit_adapter.errors import LitAdapterError


def check_finite(loss: torch.Tensor, trainer: Any) -> None:
    """Stop training with one line (naming the last good checkpoint) when the loss of any process is not finite."""
    finite = bool(torch.isfinite(loss.detach()))
    if trainer.world_size > 1:
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
    if finite:
        return
    callback = trainer.checkpoint_callback
    last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
    raise LitAdapterError(
        f"step {trainer.global_step}: the training loss is {loss.item()}; training stopped and {kept} "
        "(lower the learning rate or check the data, then resume with --ckpt_path last)"
    )


class SourceLosses:
    """Sums of token losses and token counts per source, accumulated over a validation epoch."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}

    def reset(self) -> None:
        self.sums = {}

    def add(self, source: str, total: torch.Tensor, count: torch.Tensor) -> None:
        sums = self.sums.setdefault(source, [0.0, 0.0])
        sums[0] += float(total)
        sums[1] += float(count)

    def reduce(self, strategy: Any, device: torch.device) -> tuple[Optional[float], dict[str, float]]:
        """(the loss over every set, {source: loss}), summed over all processes in float64; (None, {}) without
        validation data. A collective call: every process takes part."""
        losses = {}
        for source in SOURCES:
            sums = torch.tensor(self.sums.get(source, [0.0, 0.0]), dtype=torch.float64, device=device)
            sums = strategy.reduce(sums, reduce_op="sum")
            if sums[1] > 0:
                losses[source] = sums
        if not losses:
            return None, {}
        total = sum(losses.values())
        return float(total[0] / total[1]), {source: float(s[0] / s[1]) for source, s in losses.items()}
