"""LitAdapterModule: the settings it hands the data, routing of one optimizer step, the float32 guard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from lit_adapter.checkpoint import load_config, tokenizer_path
from lit_adapter.errors import LitAdapterError
from lit_adapter.training.precision import AdapterPrecision
from tests.training import helpers


def test_the_data_settings_are_the_models(stories260k_dir: Path) -> None:
    settings = helpers.module(stories260k_dir).data_settings
    assert Path(settings.tokenizer_path) == tokenizer_path(stories260k_dir)
    assert settings.max_seq_length == load_config(stories260k_dir).max_seq_len
    assert (settings.prompt_style, settings.clip_model, settings.image_size) == ("raw", helpers.TINY_CLIP_MODEL, None)
    assert helpers.module(stories260k_dir, visual=False).data_settings.clip_model is None  # no visual encoder


def test_one_optimizer_step_over_batches_of_two_sources_is_refused(stories260k_dir: Path) -> None:
    lit = helpers.module(stories260k_dir)
    lit.configure_model()
    lit._window_sources = {"instruction", "caption"}
    with pytest.raises(LitAdapterError, match=r"accumulated batches of \['caption', 'instruction'\]"):
        lit.on_before_optimizer_step(torch.optim.SGD([torch.zeros(1, requires_grad=True)]))


def test_a_cast_of_the_trainable_parameters_is_refused_with_the_plugin_to_use(
    stories260k_dir: Path, instructions: Path, tmp_path: Path
) -> None:
    lit = helpers.module(stories260k_dir, visual=False)
    trainer = Trainer(accelerator="cpu", devices=1, precision="bf16-true", max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, default_root_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(LitAdapterError, match=r"pass plugins=\[AdapterPrecision\(...\)\]"):
        trainer.fit(lit, datamodule=helpers.joint_data(lit, instructions, captions=False))


def test_adapter_precision_casts_only_the_frozen_weights_without_rounding_the_trainable_ones(
    stories260k_dir: Path,
) -> None:
    lit = helpers.module(stories260k_dir, visual=False)
    lit.configure_model()
    with torch.no_grad():
        lit.model.llama.norm.weight.add_(1e-4)  # a value bf16 cannot hold
    before = helpers.trainable_state(lit.model)
    AdapterPrecision("bf16-true").convert_module(lit)
    for name, param in lit.model.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32 and torch.equal(param, before[name]), name
        elif param.is_floating_point():
            assert param.dtype == torch.bfloat16, name
