"""The lr schedule: linear warmup then half-cosine, counted in optimizer steps (gradient accumulation included)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lit_adapter.errors import LitAdapterError
from lit_adapter.training.schedule import lr_factor, resolve_warmup_steps
from tests.training import helpers


def test_factor_by_hand() -> None:
    # warmup 4 of 10 updates: 1/4, 2/4, 3/4, 1; then (1 + cos(pi * k / 7)) / 2 for k = 1..6
    expected = [0.25, 0.5, 0.75, 1.0] + [(1 + math.cos(math.pi * k / 7)) / 2 for k in range(1, 7)]
    assert [lr_factor(s, 4, 10) for s in range(10)] == pytest.approx(expected, abs=1e-15)
    assert lr_factor(3, 4, 10) == 1.0  # exactly the peak at the last warmup update
    assert lr_factor(9, 4, 10) > 0  # the last update still learns
    # a floor: min + (1 - min) * cosine
    assert lr_factor(6, 4, 10, min_lr_ratio=0.1) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 3 / 7)) / 2)
    assert lr_factor(0, 0, 3) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_warmup_in_epochs_is_converted_to_optimizer_steps() -> None:
    # official V1: 2 warmup epochs; 52K examples / (8 GPUs x 4) = 1625 optimizer steps per epoch
    assert resolve_warmup_steps(None, 2, steps_per_epoch=1625, total_steps=5 * 1625) == 3250
    assert resolve_warmup_steps(None, 0.5, steps_per_epoch=7, total_steps=70) == 4
    assert resolve_warmup_steps(20, None, steps_per_epoch=7, total_steps=10) == 10
    with pytest.raises(LitAdapterError, match="either warmup_steps or warmup_epochs"):
        resolve_warmup_steps(3, 1.0, 10, 100)


class LearningRates(helpers.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_peak_is_reached_at_the_end_of_warmup_with_gradient_accumulation(
    stories260k_dir: Path, instructions: Path, tmp_path: Path
) -> None:
    peak = 0.004
    lit = helpers.module(stories260k_dir, visual=False, learning_rate=peak, warmup_steps=3)
    lrs = LearningRates()
    trainer = helpers.trainer(tmp_path, max_steps=5, accumulate_grad_batches=3, callbacks=[lrs])
    trainer.fit(lit, datamodule=helpers.joint_data(lit, instructions, captions=False, batch_size=2))
    assert trainer.global_step == 5
    # one lr per optimizer step (not per micro-batch): 1/3, 2/3, 1, then the cosine over the 2 remaining updates
    assert lrs.lrs[2] == peak
    expected = [peak / 3, 2 * peak / 3, peak, peak * (1 + math.cos(math.pi / 3)) / 2,
                peak * (1 + math.cos(2 * math.pi / 3)) / 2]  # fmt: skip
    assert lrs.lrs == pytest.approx(expected, rel=1e-12)
