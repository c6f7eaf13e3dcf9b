"""`lit-adapter fit` and `lit-adapter validate`: LightningCLI over LitAdapterModule and JointDataModule.

Defaults added here: a fixed seed (42), a progress bar, CSV + TensorBoard loggers under the run folder
(`trainer.default_root_dir`), a checkpoint every `checkpoint.every_n_train_steps` optimizer steps into
`<run folder>/checkpoints` (with `last.ckpt`, so `--ckpt_path last` resumes the run), atomic checkpoint writes,
precision "bf16-true" on a GPU, "32-true" on CPU (a half "-true" precision keeps the trainable parameters float32:
`AdapterPrecision`), throughput logging, the adapter export and the summary at the end of fit (callbacks.py).

The one connection between model and data: `model.data_settings` (tokenizer, context length, image transform,
prompt style, each set once on the model) is linked to `data.model_settings`. The checks that need both (DDP with
unused parameters, routing with image-bearing instruction data) run here, before fit, on what the data declares.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lit_adapter.data.batch import INSTRUCTION
from lit_adapter.data.joint import JointDataModule
from lit_adapter.errors import LitAdapterError
from lit_adapter.training.callbacks import default_callbacks
from lit_adapter.training.checkpoint_io import AtomicCheckpointIO
from lit_adapter.training.module import LitAdapterModule
from lit_adapter.training.precision import trainer_precision

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
        parser.add_argument("--export_adapter", type=bool, default=True,
                            help="at the end of fit, write the adapter (and training.yaml) into the run folder")
        parser.link_arguments("model.data_settings", "data.model_settings", apply_on="instantiate")
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
        chosen = self.config_init[self.subcommand] if self.subcommand else self.config_init
        root = Path(config.trainer.default_root_dir or DEFAULT_ROOT)
        if config.trainer.logger in (None, True):
            kwargs["logger"] = [CSVLogger(root, name="logs"), TensorBoardLogger(root, name="tensorboard")]
        precision = trainer_precision(config.trainer.precision)
        kwargs["precision"] = precision["precision"]
        kwargs["plugins"] = [*(_as_list(chosen.trainer.plugins) or [AtomicCheckpointIO()]), *precision["plugins"]]
        kwargs["callbacks"] = [*_as_list(chosen.trainer.callbacks), *default_callbacks(export=config.export_adapter)]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        visual = self.model.adapter_config.visual is not None
        check_ddp_settings(self.trainer.strategy, visual, self.datamodule.carries_images)
        check_routing(self.model.hparams.route_groups, visual, self.datamodule.carries_images)


def _as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def check_ddp_settings(strategy: Any, visual: bool, carries_images: dict[str, bool]) -> None:
    """Text-only instruction batches leave the visual adapter without gradients: plain DDP would stop at the second
    step with a long message; say what to set instead."""
    from lightning.pytorch.strategies import DDPStrategy

    if not isinstance(strategy, DDPStrategy) or not visual or all(carries_images.values()):
        return
    if not strategy._ddp_kwargs.get("find_unused_parameters", False):
        raise LitAdapterError(
            "instruction batches leave the visual adapter unused, which DDP rejects: set "
            "trainer.strategy: ddp_find_unused_parameters_true"
        )


def check_routing(route_groups: bool, visual: bool, carries_images: dict[str, bool]) -> None:
    """With route_groups, instruction batches train only the language group: instruction data with images (e.g.
    ScienceQA) would never train the visual adapter."""
    if route_groups and visual and carries_images.get(INSTRUCTION, False):
        raise LitAdapterError(
            "the instruction data carries images, but route_groups lets instruction batches train only the "
            "language parameters, so the visual adapter would never train: set model.route_groups: false"
        )


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
