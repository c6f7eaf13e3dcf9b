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

import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_adapter.data.batch import INSTRUCTION
from lit_adapter.data.joint import JointDataModule
from lit_adapter.errors import LitAdapterError, first_line
from lit_adapter.training.callbacks import CountedModelSummary, default_callbacks
from lit_adapter.training.checkpoint_io import AtomicCheckpointIO
from lit_adapter.training.module import LitAdapterModule
from lit_adapter.training.precision import trainer_precision
from lit_adapter.training.resume import AFRESH, check_adapter_matches, check_resume_file, resolve_last

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
            # parse errors are raised (and become one line), not printed after the whole usage
            parser_kwargs={"prog": "lit-adapter", "exit_on_error": False,
                           **{name: {"exit_on_error": False} for name in self.subcommands()}},
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        from jsonargparse import ArgumentError

        from lit_adapter.arguments import argument_error

        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            subcommand = next((a for a in args or [] if a in self.subcommands()), None)
            known = self._subcommand_parsers.get(subcommand, parser) if subcommand else parser
            raise argument_error(err, known, f"lit-adapter {subcommand or ''}".strip(), args or []) from None

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the file here (for its hyperparameters): check it first, safely
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        self.resume_checkpoint = check_resume_file(ckpt_path), ckpt_path
        if self.resume_checkpoint[0] is not None:
            check_adapter_matches(self.resume_checkpoint[0], str(ckpt_path), _as_dict(self.config[subcommand].model))
        # Lightning would now overwrite this run's model settings with the file's saved ones, so that a resume from
        # an explicit file went on at the checkpoint's learning rate while `--ckpt_path last` takes the one given
        # now. Both take the settings given now; the adapter's must match the file's (checked above).

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
        check_accelerator(config)
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
        summary = quiet_defaults(config, chosen)
        if summary:
            kwargs["enable_model_summary"] = False  # ours replaces Lightning's (which would announce the swap)
        kwargs["callbacks"] = [*_as_list(chosen.trainer.callbacks), *summary,
                               *default_callbacks(export=config.export_adapter, bar=wants_bar(config, chosen))]
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError, ImportError) as err:
            raise LitAdapterError(trainer_setting_error(err)) from None

    def before_fit(self) -> None:
        visual = self.model.adapter_config.visual is not None
        check_ddp_settings(self.trainer.strategy, visual, self.datamodule.carries_images)
        check_routing(self.model.hparams.route_groups, visual, self.datamodule.carries_images)
        self.check_resume("fit")

    def before_validate(self) -> None:
        self.check_resume("validate")

    def check_resume(self, subcommand: str) -> None:
        """`--ckpt_path last` resolved once (and said in one line when there is none yet); the checkpoint's adapter
        settings compared with this run's."""
        checkpoint, ckpt_path = self.resume_checkpoint
        if ckpt_path == "last":
            ckpt_path = resolve_last(self.trainer, subcommand)
            self.config_init[subcommand]["ckpt_path"] = ckpt_path
            checkpoint = check_resume_file(ckpt_path)
        if checkpoint is not None:
            check_adapter_matches(checkpoint, str(ckpt_path), self.model.hparams)


def wants_bar(config: Any, chosen: Any) -> bool:
    """Whether our progress bar goes in: the bar is on and no callback of the user's is a bar."""
    own = any(isinstance(callback, ProgressBar) for callback in _as_list(chosen.trainer.callbacks))
    return config.trainer.enable_progress_bar is not False and not own


def quiet_defaults(config: Any, chosen: Any) -> list:
    """Our model summary (Lightning's plain one without its FLOPs, which it cannot count for our model) unless the
    user chose one or none; its "0 Total Flops" line goes too (`_quiet_lines`)."""
    own = any(isinstance(callback, ModelSummary) for callback in _as_list(chosen.trainer.callbacks))
    if own or config.trainer.enable_model_summary is False:
        return []
    return [CountedModelSummary(max_depth=1)]


def _as_dict(namespace: Any) -> dict:
    return namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace)


def _as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def check_accelerator(config: Any) -> None:
    """A GPU recipe on a machine without one fails here, in one line, before anything is built."""
    accelerator = str(config.trainer.accelerator or "auto")
    if accelerator == "tpu":
        from lightning.fabric.accelerators.xla import XLAAccelerator

        if not XLAAccelerator.is_available():
            raise LitAdapterError("trainer.accelerator: tpu, but this machine has no TPU that torch_xla can use; "
                                  "pass --trainer.accelerator cpu (or gpu)")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        files = ", ".join(str(path) for path in config.get("config") or [])
        raise LitAdapterError(
            f"trainer.accelerator: {accelerator}{f' (in {files})' if files else ''}, but this machine has no CUDA "
            "GPU; to run on CPU pass --trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto "
            "--trainer.precision 32-true"
        )


def trainer_setting_error(err: Exception) -> str:
    """Lightning's complaint about a trainer setting, naming the option it is about (`max_steps` ->
    trainer.max_steps): the first Trainer argument the message names, quoted first."""
    import inspect

    from lightning.pytorch import Trainer

    text = " ".join(str(err).split())
    arguments = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    quoted = re.findall(r"`(\w+)", text)
    words = re.findall(r"\w+", text)
    named = next((word for word in [*quoted, *words] if word in arguments), None)
    return f"{f'trainer.{named}' if named else 'trainer settings'}: {text}"


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


class _InformationToStdout(logging.StreamHandler):
    """Lightning's information lines (seed, devices, restored checkpoint) go to stdout, with its progress bar and
    the summary; its warnings and errors stay on stderr, so a failed run's stderr is its one error line. Lines a
    user cannot act on are left out (`_quiet_lines`)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.addFilter(lambda record: record.levelno < logging.WARNING)
        self.addFilter(_quiet_lines)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout  # the stdout of the moment (a caller may have swapped it)
        super().emit(record)


# Lightning's advertisement for its cloud logger, printed on every fit
_TIP = "💡 Tip:"
_NO_FLOPS = re.compile(r"\n?^[ \t]*0[ \t]+Total Flops[ \t]*$", re.MULTILINE)


def _quiet_lines(record: logging.LogRecord) -> bool:
    """Drop the logger tip; cut the model summary's "0 Total Flops" line (a count Lightning did not make)."""
    message = record.getMessage()
    if message.startswith(_TIP):
        return False
    if _NO_FLOPS.search(message):
        record.msg, record.args = _NO_FLOPS.sub("", message), ()
    return True


def information_to_stdout() -> None:
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        if any(isinstance(handler, _InformationToStdout) for handler in logger.handlers):
            continue
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                handler.setLevel(logging.WARNING)
                logger.addHandler(_InformationToStdout())


def run_cli(subcommand: str, argv: list[str]) -> AdapterCLI:
    information_to_stdout()
    with warnings.catch_warnings():
        # `lit-adapter fit ...` hands its own arguments over explicitly; LightningCLI would warn about sys.argv
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        # the frozen CLIP tower stays in eval mode on purpose
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
        # Lightning's own use of a torch pytree class torch deprecates: nothing a user can change
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        try:
            return AdapterCLI(args=[subcommand, *argv])
        except RuntimeError as err:  # what the resume checks above cannot foresee (e.g. another base model)
            if "state_dict" not in str(err):
                raise
            raise LitAdapterError(f"--ckpt_path: the checkpoint does not fit this model ({first_line(err)}); "
                                  f"{AFRESH}") from None


def fit_main(argv: list[str]) -> None:
    """Train adapters: `lit-adapter fit --config configs/demo.yaml [--trainer.max_steps N] [--ckpt_path last]`."""
    run_cli("fit", argv)


def validate_main(argv: list[str]) -> None:
    """Validation loss of a model and adapter: `lit-adapter validate --config X [--ckpt_path FILE]`."""
    run_cli("validate", argv)
