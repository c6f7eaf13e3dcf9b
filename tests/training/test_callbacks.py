"""The callbacks of a fit: throughput logging, the adapter export, the summary."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger

from lit_adapter.checkpoint import load_yaml
from lit_adapter.training.callbacks import AdapterExport, FitSummary, TrainingThroughput, default_callbacks
from lit_adapter.training.checkpoint_io import CheckpointHygiene
from tests.training import helpers


def test_a_fit_with_the_default_callbacks_logs_exports_and_summarises(
    stories260k_dir: Path, instructions: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    lit = helpers.module(stories260k_dir, visual=False)
    callbacks = default_callbacks()
    assert [type(c) for c in callbacks] == [TrainingThroughput, AdapterExport, FitSummary, CheckpointHygiene]
    trainer = helpers.trainer(tmp_path, max_steps=2, callbacks=callbacks, limit_val_batches=1, val_check_interval=2,
                              num_sanity_val_steps=1, log_every_n_steps=1, logger=CSVLogger(tmp_path, name="logs"))
    trainer.fit(lit, datamodule=helpers.joint_data(lit, instructions, captions=False))
    out = capsys.readouterr().out
    assert f"validation loss before training: {lit.initial_val_loss:.4f} (instruction " in out
    summary = out[out.index("training summary"):]
    assert "optimizer steps: 2" in summary and "tokens/s" in summary and f"adapter: {tmp_path}" in summary
    config = load_yaml(tmp_path / "adapter_config.yaml")
    assert config["prompt_style"] == "raw" and config["adapter_len"] == 4  # the model's, which the data used
    training = load_yaml(tmp_path / "training.yaml")
    assert training["optimizer_steps"] == 2 and training["tokens_per_second"] > 0
    assert training["val_loss_before"] == lit.initial_val_loss and training["val_loss_after"] == lit.last_val_loss
    assert callbacks[0].tokens > 0 and trainer.callback_metrics["tokens_per_sec"] > 0
    assert "peak_memory_gb" in trainer.callback_metrics


def test_without_export_nothing_is_written_and_the_summary_says_so(
    stories260k_dir: Path, instructions: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    lit = helpers.module(stories260k_dir, visual=False)
    trainer = helpers.trainer(tmp_path, max_steps=1, callbacks=default_callbacks(export=False))
    trainer.fit(lit, datamodule=helpers.joint_data(lit, instructions, captions=False))
    assert "adapter: not exported" in capsys.readouterr().out
    assert not (tmp_path / "adapter.safetensors").exists()
