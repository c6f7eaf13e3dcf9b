"""`lit-adapter fit` and `lit-adapter validate`: LightningCLI over LitAdapterModule and JointDataModule.

Defaults added here: a fixed seed (42), a progress bar, CSV + TensorBoard loggers under the run folder
(`trainer.default_root_dir`), a checkpoint every `checkpoint.every_n_train_steps` optimizer steps into
`<run folder>/checkpoints` (with `last.ckpt`, so `--ckpt_path last` resumes the run), atomic checkpoint writes, and
precision "bf16-true" on a GPU, "32-true" on CPU.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lit_adapter.data.joint import JointDataModule
from lit_adapter.training.checkpoint_io import AtomicCheckpointIO
from lit_adapter.training.module import LitAdapterModule

DEFAULT_ROOT = "out/lit-adapter"
CHECKPOINT_EVERY = 100


def default_precision() -> str:
    return "bf16-true" if torch.cuda.is_available() else "32-true"


class AdapterCLI(LightningCLI):
    """LightningCLI with the project's defaults (see the module docstring)."""

    def __init__(self, args: Optional[list[str]] = None, run: bool = True) -> None:
        super().__init__(
            LitAdapterModule,
            JointDataModule,
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
            run=run,
            parser_kwargs={"prog": "lit-adapter"},
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "trainer.precision": default_precision(),
                "trainer.default_root_dir": DEFAULT_ROOT,
                "checkpoint.every_n_train_steps": CHECKPOINT_EVERY,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "step-{step:07d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = Path(config.trainer.default_root_dir or DEFAULT_ROOT)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(root / "checkpoints")

    def instantiate_trainer(self, **kwargs: Any):
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = Path(config.trainer.default_root_dir or DEFAULT_ROOT)
        if config.trainer.logger in (None, True):
            kwargs["logger"] = [CSVLogger(root, name="logs"), TensorBoardLogger(root, name="tensorboard")]
        if not config.trainer.plugins:
            kwargs["plugins"] = [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)


def run_cli(subcommand: str, argv: list[str]) -> AdapterCLI:
    with warnings.catch_warnings():
        # `lit-adapter fit ...` hands its own arguments over explicitly; LightningCLI would warn about sys.argv
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        # the frozen CLIP tower stays in eval mode on purpose
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
        return AdapterCLI(args=[subcommand, *argv])


def fit_main(argv: list[str]) -> None:
    """Train adapters: `lit-adapter fit --config configs/demo.yaml [--trainer.max_steps N] [--ckpt_path last]`."""
    run_cli("fit", argv)


def validate_main(argv: list[str]) -> None:
    """Validation loss of a model and adapter: `lit-adapter validate --config X [--ckpt_path FILE]`."""
    run_cli("validate", argv)
