"""The model a fit trains: its base folder, the one build (plain, or on the meta device for FSDP), and the settings
the data takes from it.

The dtype policy is applied here, once: `build_adapter_model` creates the adapter parameters in float32 (trained norms
included), and after `trainable` patterns every trainable parameter is checked float32; `precision.AdapterPrecision`
then keeps them so through Lightning's cast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch

from lit_adapter.adapters import AdapterConfig, AdapterModel, build_adapter_model, load_adapter
from lit_adapter.checkpoint import load_config, tokenizer_path
from lit_adapter.data.base import DataSettings
from lit_adapter.errors import LitAdapterError
from lit_adapter.model import Block
from lit_adapter.training.optim import apply_trainable_patterns
from lit_adapter.training.precision import trainable_to_float32


def resolve_checkpoint_dir(checkpoint_dir: Union[str, Path]) -> Path:
    """A checkpoint folder, or the name "stories260K" (converted once into the cache)."""
    if str(checkpoint_dir) == "stories260K" and not Path(checkpoint_dir).is_dir():
        from lit_adapter.download import stories260k_checkpoint

        return stories260k_checkpoint()
    return Path(checkpoint_dir)


def build_for_training(base_dir: Path, config: AdapterConfig, hparams: Any, sharded: bool) -> AdapterModel:
    """The AdapterModel to train, with `hparams`' init_adapter, trainable patterns, activation checkpointing and
    compiled blocks. Sharded (FSDP): on the meta device; the strategy loads the weights after sharding."""
    if sharded and (hparams.activation_checkpointing or hparams.compile_blocks):
        raise LitAdapterError("with AdapterFSDPStrategy set trainer.strategy.init_args.activation_checkpointing "
                              "instead of model.activation_checkpointing; model.compile_blocks is not supported")
    if sharded:
        from lit_adapter.training.fsdp import prepare_for_sharding

        model = prepare_for_sharding(build_adapter_model(base_dir, config, device="meta", dtype=torch.float32))
    else:  # the strategy's init context gives device and dtype: the frozen weights load straight into them
        model = build_adapter_model(base_dir, config, device=torch.empty(0).device, dtype=torch.get_default_dtype())
        if hparams.init_adapter:
            load_adapter(model, hparams.init_adapter)
    apply_trainable_patterns(model, hparams.trainable)
    trainable_to_float32(model)
    if hparams.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(model.llama, check_fn=lambda module: isinstance(module, Block))
    if hparams.compile_blocks:
        for block in model.llama.layers:
            block.compile()
    return model


def data_settings(base_dir: Path, config: AdapterConfig) -> DataSettings:
    """What the data takes from the model: its tokenizer, context length, image transform and prompt style."""
    visual = config.visual
    return DataSettings(
        tokenizer_path=str(tokenizer_path(base_dir)),
        max_seq_length=load_config(base_dir).max_seq_len,
        prompt_style=config.prompt_style,
        clip_model=visual.clip_model if visual is not None else None,
        image_size=visual.image_size if visual is not None else None,
    )
