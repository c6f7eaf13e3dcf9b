"""What a fit reports and leaves behind, as callbacks (`lit-adapter fit` adds `default_callbacks()`).

- `TrainingThroughput` logs `tokens_per_sec` (input tokens, padding excluded, per second of training step, summed
  over all processes) and `peak_memory_gb` after every training batch. Lightning's `ThroughputMonitor` does not fit
  here: it reports only once a window of batches is full (100 by default), under its own metric names, measures wall
  time between batch ends (data loading included) on rank 0 alone, and gives no figure for the whole run, which the
  summary and training.yaml need.
- `AdapterExport` writes adapter.safetensors + adapter_config.yaml, the base's tokenizer and model config, and
  training.yaml (the base folder and the run's figures) into the run folder at the end of an uninterrupted fit; an
  adapter with a non-finite tensor is refused (one line, nothing written); at the start of training it removes the
  temporaries a kill during an earlier export left there.
- `CheckpointHygiene` (checkpoint_io.py) removes what killed checkpoint writes left and keeps `save_top_k` across
  resumes.
- `FitSummary` prints the validation loss before training (the sanity check) and the summary at the end of fit.
- `CountedModelSummary`: Lightning's plain model summary without its FLOPs column, which would say 0.
- `progress_bar()`: Lightning's bar (rich's when rich is installed, else tqdm's) showing each source's latest training
  loss (`train_instruction_loss`, `train_caption_loss`) instead of `train_loss`, which alternates between the
  sources in joint training, and the epoch alone where a run is counted in steps (rich's bar would say "Epoch 1/-2").
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar, TQDMProgressBar

from lit_adapter.checkpoint import CONFIG_FILE, load_config, save_yaml, tokenizer_path
from lit_adapter.data.batch import SOURCES
from lit_adapter.devices import peak_memory_gb
from lit_adapter.errors import LitAdapterError
from lit_adapter.files import atomic_path, remove_stale_temporaries
from lit_adapter.tokenizer import copy_tokenizer
from lit_adapter.training.checkpoint_io import CheckpointHygiene
from lit_adapter.training.metrics import NonFiniteGuard, nonfinite_count
from lit_adapter.training.names import STATE_PREFIX
from lit_adapter.training.report import format_summary, run_figures

TRAINING_FILE = "training.yaml"


class TrainingThroughput(Callback):
    """Tokens per second of training step and peak memory, logged after every training batch."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self.world_size = 1
        self._start: Optional[float] = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
        self.tokens += int(batch["attention_mask"].sum())
        self.world_size = trainer.world_size
        pl_module.log("tokens_per_sec", self.tokens_per_second())
        pl_module.log("peak_memory_gb", peak_memory_gb(pl_module.device))

    def tokens_per_second(self) -> float:
        return self.tokens * self.world_size / self.seconds if self.seconds else 0.0


def _tokens_per_second(throughput: Optional[TrainingThroughput]) -> float:
    return throughput.tokens_per_second() if throughput is not None else 0.0


class AdapterExport(Callback):
    """At the end of an uninterrupted fit, the adapter and what loads it, in `dirpath` (default: the run folder,
    `trainer.default_root_dir`); global rank 0 writes, the others wait.

    Args:
        dirpath: where to write; None = trainer.default_root_dir
        throughput: the run's throughput callback, whose figure goes into training.yaml
    """

    def __init__(self, dirpath: Optional[str] = None, throughput: Optional[TrainingThroughput] = None) -> None:
        self.dirpath = dirpath
        self.throughput = throughput
        self.exported_to: Optional[Path] = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:  # what a kill during an earlier export left
            remove_stale_temporaries(Path(self.dirpath or trainer.default_root_dir))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.interrupted:
            tensors = adapter_tensors(trainer, pl_module)  # a collective call under FSDP: every rank takes part
            check_finite_export(trainer, tensors)
            if trainer.is_global_zero:
                self.write(Path(self.dirpath or trainer.default_root_dir), trainer, pl_module, tensors)
        trainer.strategy.barrier()

    def write(self, out_dir: Path, trainer: Trainer, module: Any, tensors: dict[str, torch.Tensor]) -> None:
        from lit_adapter.adapters.formats import write_adapter

        out_dir.mkdir(parents=True, exist_ok=True)
        base_dir = module.base_dir
        write_adapter(out_dir, module.adapter_config, tensors, load_config(base_dir))
        copy_tokenizer(tokenizer_path(base_dir), out_dir)  # tokenizer.model or tokenizer.json (+ its HF files)
        with atomic_path(out_dir / CONFIG_FILE) as tmp:
            shutil.copyfile(base_dir / CONFIG_FILE, tmp)
        figures = {**run_figures(trainer, module, _tokens_per_second(self.throughput)), **_skipped(trainer)}
        save_yaml({"checkpoint_dir": str(base_dir.resolve()), **figures}, out_dir / TRAINING_FILE)
        self.exported_to = out_dir


def _skipped(trainer: Trainer) -> dict[str, int]:
    """{"skipped_steps": N} when the run skipped non-finite steps (NonFiniteGuard with action "skip"), else {}."""
    guards = [cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard)]
    skipped = sum(guard.skipped for guard in guards)
    return {"skipped_steps": skipped} if skipped or any(guard.action == "skip" for guard in guards) else {}


def check_finite_export(trainer: Trainer, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse (on every rank alike) to export an adapter holding a non-finite tensor."""
    bad = [name for name, tensor in tensors.items() if nonfinite_count([tensor])] if trainer.is_global_zero else []
    count = trainer.strategy.broadcast(len(bad))
    if count:
        example = f" (e.g. {bad[0]})" if bad else ""
        raise LitAdapterError(f"the trained adapter holds {count} non-finite tensors{example}; it was not exported")


def adapter_tensors(trainer: Trainer, module: Any) -> dict[str, torch.Tensor]:
    """Every adapter tensor (trained or not), full size, on CPU (under FSDP gathered onto global rank 0)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return {name: t.detach().cpu() for name, t in module.model.adapter_state_dict().items()}
    from lit_adapter.training.fsdp import gather_full_tensors

    names = {STATE_PREFIX + name for name in module.model.adapter_names}
    gathered = gather_full_tensors(trainer.strategy.model, names, rank0_only=True)
    return {name.removeprefix(STATE_PREFIX): tensor for name, tensor in gathered.items()}


class FitSummary(Callback):
    """Prints (global rank 0) the validation loss of the sanity check, "before training", and the run's summary.

    Args:
        throughput: the run's throughput callback
        export: the run's export callback (the summary names the adapter it wrote)
    """

    def __init__(self, throughput: Optional[TrainingThroughput] = None, export: Optional[AdapterExport] = None) -> None:
        self.throughput = throughput
        self.export = export

    def on_sanity_check_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        losses = pl_module.val_losses
        if not trainer.is_global_zero or not losses:
            return
        parts = ", ".join(f"{source} {loss:.4f}" for source, loss in losses.items())
        limit = trainer.num_sanity_val_steps
        scope = "" if limit == float("inf") else f"; first {limit} batches of each set"
        print(f"validation loss before training: {pl_module.initial_val_loss:.4f} ({parts}{scope})", flush=True)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            exported = self.export.exported_to if self.export is not None else None
            figures = run_figures(trainer, pl_module, _tokens_per_second(self.throughput))
            skipped = _skipped(trainer)
            summary = format_summary(figures, exported)
            if skipped:
                summary += f"\n  skipped steps (non-finite loss or gradients): {skipped['skipped_steps']}"
            print(summary, flush=True)


class SourceLossesInBar:
    """Progress-bar metrics with each source's latest training loss in place of `train_loss` (mixed into a bar)."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        losses = {name: float(value) for source in SOURCES
                  if (value := trainer.callback_metrics.get(name := f"train_{source}_loss")) is not None}
        if losses:
            metrics.pop("train_loss", None)
            metrics.update(losses)
        return metrics


class CountedModelSummary(ModelSummary):
    """Lightning's model summary without the FLOPs it did not count (0: our model declares no example input)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        if not total_flops:
            summary_data = [(name, values) for name, values in summary_data if name != "FLOPs"]
        ModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                               total_flops, **summarize_kwargs)


class SourceTQDMProgressBar(SourceLossesInBar, TQDMProgressBar):
    """tqdm's bar with the per-source training losses."""


class SourceRichProgressBar(SourceLossesInBar, RichProgressBar):
    """rich's bar with the per-source training losses and, for a run counted in steps, the epoch alone."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"  # max_epochs -1: no epoch limit, the run is counted in steps
        return f"{description:{len(self.validation_description)}}"  # as wide as "Validation": no flicker


def progress_bar() -> Callback:
    """The bar of `lit-adapter fit`: rich's when rich is installed (as Lightning's default), else tqdm's."""
    from importlib.util import find_spec

    return SourceRichProgressBar() if find_spec("rich") is not None else SourceTQDMProgressBar()


def default_callbacks(export: bool = True, bar: bool = False) -> list[Callback]:
    """Throughput logging, the export at the end of fit (unless `export` is False), the summary (in this order: the
    summary names the exported adapter), the checkpoint folders' hygiene and, with `bar`, the progress bar."""
    throughput = TrainingThroughput()
    exporter = AdapterExport(throughput=throughput) if export else None
    callbacks = [throughput, *([exporter] if exporter else []), FitSummary(throughput, exporter), CheckpointHygiene()]
    return [*callbacks, progress_bar()] if bar else callbacks
