"""LitAdapterModule: a frozen LLaMA with LLaMA-Adapter V1/V2 adapters, trained by Lightning (steps, routing,
optimizer, schedule; export, summary and throughput are callbacks, see callbacks.py; the NaN guard is metrics.py).

Precision: trainable parameters, and so the optimizer state, stay float32 whatever the frozen dtype (see
precision.py: applied once after the build, and kept through Lightning's cast by `AdapterPrecision`).

Joint training (V2): each batch names its source ("instruction" or "caption"). With `route_groups`, the optimizer
step after a caption batch updates only the "visual" parameter group and after an instruction batch only the
"language" group. The mechanism is one AdamW with per-step routing: in `on_before_optimizer_step` the gradients of
the other group are set to None. torch's AdamW skips a parameter whose .grad is None entirely (no moment update, no
weight decay, no step count), so the other group stays bit-identical, and gradient clipping then only sees the routed
group. One optimizer (instead of two under manual optimisation) keeps Lightning's gradient accumulation, clipping,
precision and checkpointing; `ResumableLoader` makes every accumulation window hold batches of a single source. Under
DDP a step leaves some trainable parameters unused, so DDP needs `find_unused_parameters=True`.

The data takes the model's tokenizer, context length, image transform and prompt style from `data_settings`
(`lit-adapter fit` links it to the data module); the model never looks at the data module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Literal, Optional

import torch
from lightning.pytorch import LightningModule

from lit_adapter.adapters import AdapterConfig, AdapterModel
from lit_adapter.adapters.groups import parameter_groups
from lit_adapter.data.base import DataSettings
from lit_adapter.data.batch import CAPTION, INSTRUCTION, TrainingBatch
from lit_adapter.errors import LitAdapterError
from lit_adapter.training.build import build_for_training, data_settings, resolve_checkpoint_dir
from lit_adapter.training.loss import head_cross_entropy
from lit_adapter.training.metrics import NonFiniteGuard, SourceLosses
from lit_adapter.training.names import STATE_PREFIX, check_state_keys, clean_name
from lit_adapter.training.optim import decay_groups, initialise_adamw_state
from lit_adapter.training.precision import check_float32_trainables
from lit_adapter.training.schedule import apply_peak_lr, schedule_for

SOURCE_GROUP = {CAPTION: "visual", INSTRUCTION: "language"}


class LitAdapterModule(LightningModule):
    """Trains LLaMA-Adapter parameters on a frozen LLaMA.

    Args:
        checkpoint_dir: the base model's checkpoint folder (from `lit-adapter convert`), or "stories260K"
        adapter: which adapters to attach (AdapterConfig; e.g. the V1 or V2 settings), with the prompt style the
            data is formatted in (handed to the data, and written into adapter_config.yaml)
        learning_rate: peak learning rate (official V1: 9e-3 x effective batch / 256)
        weight_decay: AdamW weight decay (not applied to biases and other 1-D parameters)
        betas: AdamW betas
        warmup_steps: linear warmup length in optimizer steps (or use warmup_epochs)
        warmup_epochs: linear warmup length in epochs (may be fractional)
        min_lr: the learning rate the cosine decay ends at
        route_groups: joint training: caption batches update only the visual group, instruction batches only the
            language group (off: every batch updates every trainable parameter)
        trainable: glob patterns over adapter parameter names (e.g. "llama.*.bias"); only matching adapter
            parameters train, the others stay frozen at their initial (or init_adapter) values; None = all
        init_adapter: start from this adapter (folder or adapter.safetensors, e.g. a previous training phase)
        activation_checkpointing: recompute each block's activations in backward (FSDP: set the strategy's
            activation_checkpointing instead)
        compile_blocks: torch.compile each LLaMA block (faster steps once compiled; the first steps compile)
        nonfinite: on a non-finite loss or gradient, "stop" before the step or "skip" it (counted; NonFiniteGuard)
        skip_limit: with "skip", this many skipped steps in a row stop the run all the same
    """

    def __init__(
        self,
        checkpoint_dir: str = "stories260K",
        adapter: Optional[AdapterConfig] = None,
        learning_rate: float = 1.125e-3,
        weight_decay: float = 0.02,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: Optional[int] = None,
        warmup_epochs: Optional[float] = None,
        min_lr: float = 0.0,
        route_groups: bool = True,
        trainable: Optional[list[str]] = None,
        init_adapter: Optional[str] = None,
        activation_checkpointing: bool = False,
        compile_blocks: bool = False,
        nonfinite: Literal["stop", "skip"] = "stop",
        skip_limit: int = 10,
    ) -> None:
        super().__init__()
        self.adapter_config = adapter if adapter is not None else AdapterConfig()
        self.save_hyperparameters(ignore=["adapter"])
        self.hparams["adapter"] = self.adapter_config.to_dict()
        self.checkpoint_dir = checkpoint_dir
        self.model: Optional[AdapterModel] = None
        self.strict_loading = False  # checkpoints hold only the trainable state
        self.group_sizes: dict[str, int] = {}
        self.initial_val_loss: Optional[float] = None
        self.last_val_loss: Optional[float] = None
        self.val_losses: dict[str, float] = {}  # per source, of the last validation
        self._val = SourceLosses()
        self._window_sources: set[str] = set()

    # ---- the model ----

    @property
    def base_dir(self) -> Path:
        return resolve_checkpoint_dir(self.checkpoint_dir)

    @property
    def data_settings(self) -> DataSettings:
        """What the data takes from this model: tokenizer, context length, image transform, prompt style."""
        return data_settings(self.base_dir, self.adapter_config)

    def configure_model(self) -> None:
        if self.model is None:
            self.model = build_for_training(self.base_dir, self.adapter_config, self.hparams, self._sharded())
            groups = parameter_groups(self.model).items()
            self.group_sizes = {name: sum(p.numel() for _, p in params) for name, params in groups}

    def after_sharding(self, root: torch.nn.Module) -> None:
        """Called by AdapterFSDPStrategy once the model is sharded: load the base weights (and init_adapter)."""
        from lit_adapter.training.fsdp import load_after_sharding

        load_after_sharding(root, self.base_dir, self.hparams.init_adapter)

    def _sharded(self) -> bool:
        from lightning.pytorch.strategies import FSDPStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)

    def trainable_names(self) -> list[str]:
        """State-dict keys (relative to this module) of the parameters being trained."""
        return [STATE_PREFIX + clean_name(n) for n, p in self.model.named_parameters() if p.requires_grad]

    def forward(
        self, input_ids: torch.Tensor, images: Optional[torch.Tensor] = None, has_image: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return self.model(input_ids, images=images, has_image=has_image)

    def loss_sums(self, batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token losses, number of supervised tokens) of a batch; no full logits (see training/loss.py)."""
        hidden = self.model(
            batch["input_ids"], images=batch.get("images"), has_image=batch.get("has_image"), hidden_only=True
        )
        return head_cross_entropy(hidden, self.model.llama.output, batch["labels"])

    # ---- training ----

    def training_step(self, batch: TrainingBatch, batch_idx: int) -> torch.Tensor:
        self._window_sources.add(batch["source"])
        total, count = self.loss_sums(batch)
        loss = total / count.clamp(min=1)  # a non-finite one stops or skips the step: NonFiniteGuard
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log(f"train_{batch['source']}_loss", loss, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        sources, self._window_sources = self._window_sources, set()
        if not self.hparams.route_groups or not sources:
            return
        if len(sources) > 1:
            raise LitAdapterError(
                f"one optimizer step accumulated batches of {sorted(sources)}; use the joint data module, which keeps "
                "each accumulation window to one source, or set route_groups: false"
            )
        keep = {id(p) for _, p in parameter_groups(self.model)[SOURCE_GROUP[sources.pop()]]}
        for param in self.model.parameters():
            if param.grad is not None and id(param) not in keep:
                param.grad = None

    def configure_callbacks(self) -> list[NonFiniteGuard]:  # every fit is guarded, not only `lit-adapter fit`
        return [NonFiniteGuard(self.hparams.nonfinite, self.hparams.skip_limit)]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        check_float32_trainables(self.model)
        groups = decay_groups(self.model.named_parameters(), hp.weight_decay)
        if not groups:
            raise LitAdapterError("no trainable parameters: check the adapter config and `trainable`")
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas))
        initialise_adamw_state(optimizer)
        min_ratio = hp.min_lr / hp.learning_rate if hp.learning_rate else 0
        scheduler = schedule_for(optimizer, self.trainer, hp.warmup_steps, hp.warmup_epochs, min_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)

    # ---- validation ----

    def validation_step(self, batch: TrainingBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._val.add(batch["source"], *self.loss_sums(batch))

    def on_validation_epoch_start(self) -> None:
        self._val.reset()

    def on_validation_epoch_end(self) -> None:
        loss, self.val_losses = self._val.reduce(self.trainer.strategy, self.device)
        if loss is None:
            return
        if self.trainer.sanity_checking:  # the loss before training (FitSummary prints it)
            self.initial_val_loss = loss
            return
        self.last_val_loss = loss
        self.log("val_loss", loss, prog_bar=True, sync_dist=False)
        for source, value in self.val_losses.items():
            self.log(f"val_{source}_loss", value, sync_dist=False)

    # ---- checkpoints ----

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trainable tensors (the frozen base is rebuilt from checkpoint_dir)."""
        keep = set(self.trainable_names())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["adapter_config"] = self.adapter_config.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:  # (under FSDP the strategy has loaded and checked it already)
            self.check_trainable_keys(checkpoint["state_dict"].keys())
        apply_peak_lr(checkpoint, self.hparams.learning_rate)  # the lr configured now, not the checkpoint's

    def check_trainable_keys(self, keys: Iterable[str], origin: str = "the checkpoint") -> None:
        check_state_keys(self.trainable_names(), keys, origin)
