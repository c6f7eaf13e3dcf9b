"""What `lit-adapter fit` prints: per-source training losses in the bar, the epoch without a bogus limit, and none of
the lines a user cannot act on (the logger tip, torch's LeafSpec deprecation, "0 Total Flops")."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from lit_adapter.training.callbacks import SourceLossesInBar, SourceRichProgressBar, progress_bar
from lit_adapter.training.cli import _quiet_lines


class _Bar:
    def get_metrics(self, trainer, pl_module):
        return {"train_loss": 0.3, "lr": 0.01, "v_num": 0}


class _SourceBar(SourceLossesInBar, _Bar):
    pass


def test_the_bar_shows_each_sources_latest_loss_instead_of_the_alternating_one():
    trainer = SimpleNamespace(callback_metrics={"train_instruction_loss": torch.tensor(0.31),
                                                "train_caption_loss": torch.tensor(2.7), "train_loss": 0.31})
    metrics = _SourceBar().get_metrics(trainer, None)
    assert metrics == pytest.approx({"lr": 0.01, "v_num": 0, "train_instruction_loss": 0.31,
                                     "train_caption_loss": 2.7})
    assert _SourceBar().get_metrics(SimpleNamespace(callback_metrics={}), None)["train_loss"] == 0.3


def test_a_run_counted_in_steps_shows_its_epoch_without_a_limit():
    pytest.importorskip("rich", reason="without rich, tqdm's bar says `Epoch N` already")
    bar = progress_bar()
    assert isinstance(bar, SourceRichProgressBar)
    bar._trainer = SimpleNamespace(max_epochs=-1)  # what Lightning sets when only max_steps is given
    assert bar._get_train_description(1).strip() == "Epoch 1"
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("lightning.pytorch", logging.INFO, __file__, 1, message, (), None)


def test_lines_nobody_can_act_on_are_left_out():
    assert not _quiet_lines(record("💡 Tip: For seamless cloud logging and experiment tracking, try installing X"))
    summary = record("  | Name  | Type\n0 | model | AdapterModel\n38.4 K    Trainable params\n0         Total Flops")
    assert _quiet_lines(summary) and summary.getMessage() == (
        "  | Name  | Type\n0 | model | AdapterModel\n38.4 K    Trainable params")
    counted = record("38.4 K    Trainable params\n1.2 M     Total Flops")
    assert _quiet_lines(counted) and counted.getMessage().endswith("1.2 M     Total Flops")  # a real count stays


def test_the_demo_fit_prints_none_of_them(assets, tmp_path_factory):
    from tests.readme_runs import DEMO_FIT, demo_adapter, workspace

    demo_adapter(tmp_path_factory)
    output = workspace(tmp_path_factory).results[DEMO_FIT].stdout
    for noise in ("Tip:", "litlogger", "LeafSpec", "Total Flops", "/-2"):
        assert noise not in output, noise
