"""LitAdapterModule: a frozen LLaMA with LLaMA-Adapter V1/V2 adapters, trained by Lightning.

Precision: under "bf16-true" the frozen weights are bf16 while every trainable parameter, and so the optimizer state,
stays float32 (`to` below restores them after Lightning's whole-module cast); the adapter modules cast their float32
parameters to the activation dtype in forward.

Joint training (V2): each batch carries its source ("instruction" or "caption"). With `route_groups`, the optimizer
step after a caption batch updates only the "visual" parameter group and after an instruction batch only the
"language" group. The mechanism is one AdamW with per-step routing: in `on_before_optimizer_step` the gradients of
the other group are set to None. torch's AdamW skips a parameter whose .grad is None entirely (no moment update, no
weight decay, no step count), so the other group stays bit-identical, and gradient clipping then only sees the routed
group. One optimizer (instead of two under manual optimisation) keeps Lightning's gradient accumulation, clipping,
precision and checkpointing; `ResumableLoader` makes every accumulation window hold batches of a single source.
Under DDP a step leaves some trainable parameters unused, so DDP needs `find_unused_parameters=True`.
"""

from __future__ import annotations

import fnmatch
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from lightning.pytorch import LightningModule

from lit_adapter.adapters import AdapterConfig, AdapterModel, build_adapter_model
from lit_adapter.adapters.groups import parameter_groups
from lit_adapter.checkpoint import CONFIG_FILE, TOKENIZER_FILE, load_config, load_model, save_yaml, tokenizer_path
from lit_adapter.data.joint import CAPTION, INSTRUCTION, SOURCE_KEY
from lit_adapter.devices import peak_memory_gb
from lit_adapter.errors import LitAdapterError
from lit_adapter.model import Block
from lit_adapter.training.loss import head_cross_entropy
from lit_adapter.training.names import STATE_PREFIX, clean_name
from lit_adapter.training.optim import decay_groups, initialise_adamw_state
from lit_adapter.training.precision import default_dtype, trainable_to_float32
from lit_adapter.training.report import format_summary
from lit_adapter.training.schedule import resolve_warmup_steps, warmup_cosine

SOURCE_GROUP = {CAPTION: "visual", INSTRUCTION: "language"}


def resolve_checkpoint_dir(checkpoint_dir: str | Path) -> Path:
    """A checkpoint folder, or the name "stories260K" (converted once into the cache)."""
    if str(checkpoint_dir) == "stories260K" and not Path(checkpoint_dir).is_dir():
        from lit_adapter.download import stories260k_checkpoint

        return stories260k_checkpoint()
    return Path(checkpoint_dir)


def yields_images(source: str, part: Any) -> bool:
    """Caption data always carries images; instruction data only with an image folder (e.g. ScienceQA)."""
    return source == CAPTION or getattr(part, "image_dir", None) is not None


def batch_source(batch: dict[str, Any]) -> str:
    """The source the joint data module tagged the batch with; untagged, caption data is told by its images
    (instruction data with images, e.g. ScienceQA, flags its rows with `has_image`)."""
    if batch.get(SOURCE_KEY):
        return batch[SOURCE_KEY]
    return CAPTION if "images" in batch and "has_image" not in batch else INSTRUCTION


def check_ddp_settings(module: LightningModule) -> None:
    """Text-only instruction batches leave the visual adapter without gradients: plain DDP would stop at the second
    step with a long message; say what to set instead."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = module.trainer.strategy
    parts = getattr(module.trainer.datamodule, "parts", {})
    text_only = any(not yields_images(name, part) for name, part in parts.items())
    if not isinstance(strategy, DDPStrategy) or module.model.visual is None or not text_only:
        return
    if not strategy._ddp_kwargs.get("find_unused_parameters", False):
        raise LitAdapterError(
            "instruction batches leave the visual adapter unused, which DDP rejects: set "
            "trainer.strategy: ddp_find_unused_parameters_true"
        )


def check_routing(module: LightningModule) -> None:
    """With route_groups, instruction batches train only the language group: instruction data with images (e.g.
    ScienceQA) would never train the visual adapter."""
    instruction = getattr(module.trainer.datamodule, "parts", {}).get(INSTRUCTION)
    if not module.hparams.route_groups or module.model.visual is None or instruction is None:
        return
    if yields_images(INSTRUCTION, instruction):
        raise LitAdapterError(
            "the instruction data carries images, but route_groups lets instruction batches train only the "
            "language parameters, so the visual adapter would never train: set model.route_groups: false"
        )


class LitAdapterModule(LightningModule):
    """Trains LLaMA-Adapter parameters on a frozen LLaMA.

    Args:
        checkpoint_dir: the base model's checkpoint folder (from `lit-adapter convert`), or "stories260K"
        adapter: which adapters to attach (AdapterConfig; e.g. the V1 or V2 settings)
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
            activation_checkpointing_policy instead)
        compile_blocks: torch.compile each LLaMA block (faster steps once compiled; the first steps compile)
        export_adapter: at the end of fit, write adapter.safetensors + adapter_config.yaml into the run folder
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
        export_adapter: bool = True,
    ) -> None:
        super().__init__()
        self.adapter_config = adapter if adapter is not None else AdapterConfig()
        self.save_hyperparameters(ignore=["adapter"])
        self.hparams["adapter"] = self.adapter_config.to_dict()
        self.checkpoint_dir = checkpoint_dir
        self.model: Optional[AdapterModel] = None
        self.strict_loading = False  # checkpoints hold only the trainable state
        self.initial_val_loss: Optional[float] = None
        self.last_val_loss: Optional[float] = None
        self._val_sums: dict[str, list[float]] = {}
        self._window_sources: set[str] = set()
        self._tokens = 0
        self._train_seconds = 0.0
        self._batch_start: Optional[float] = None
        self.group_sizes: dict[str, int] = {}
        self.exported_to: Optional[Path] = None

    # ---- the model ----

    @property
    def base_dir(self) -> Path:
        return resolve_checkpoint_dir(self.checkpoint_dir)

    @property
    def tokenizer_path(self) -> Path:
        return tokenizer_path(self.base_dir)

    @property
    def max_seq_length(self) -> int:
        return load_config(self.base_dir).max_seq_len

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self._sharded():
            from lit_adapter.training.fsdp import build_for_sharding

            model = build_for_sharding(self.base_dir, self.adapter_config)
        else:
            # The strategy's init context decides device and dtype: the frozen weights load straight into them (the
            # model is built on the meta device and the weights are assigned, so there is one copy in memory).
            device, dtype = torch.empty(0).device, torch.get_default_dtype()
            base = load_model(self.base_dir, device=device, dtype=dtype)
            with default_dtype(torch.float32):  # adapter parameters are created (and initialised) in float32
                model = build_adapter_model(base, self.adapter_config)
        self.model = model
        if self.hparams.init_adapter and not self._sharded():
            self._load_initial_adapter(self.hparams.init_adapter)
        self._apply_trainable_patterns()
        groups = parameter_groups(model)
        self.group_sizes = {name: sum(p.numel() for _, p in params) for name, params in groups.items()}
        trainable_to_float32(self)
        if self.hparams.activation_checkpointing and not self._sharded():
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

            apply_activation_checkpointing(model.llama, check_fn=lambda module: isinstance(module, Block))
        if self.hparams.compile_blocks:
            if self._sharded():
                raise LitAdapterError("model.compile_blocks is not supported with AdapterFSDPStrategy: set it false")
            for block in model.llama.layers:
                block.compile()

    def after_sharding(self, root: torch.nn.Module) -> None:
        """Called by AdapterFSDPStrategy once the model is sharded: load the base weights (and init_adapter)."""
        from lit_adapter.training.fsdp import load_after_sharding

        load_after_sharding(root, self.base_dir, self.hparams.init_adapter)

    def _sharded(self) -> bool:
        from lightning.pytorch.strategies import FSDPStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)

    def _load_initial_adapter(self, path: str) -> None:
        from lit_adapter.adapters.io import load_adapter

        load_adapter(self.model, path)

    def _apply_trainable_patterns(self) -> None:
        patterns = self.hparams.trainable
        if patterns is None:
            return
        trainable = [n for n in self.model.adapter_names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not trainable:
            raise LitAdapterError(
                f"trainable={patterns} matches none of the adapter parameters (e.g. {self.model.adapter_names[:3]})"
            )
        params = dict(self.model.named_parameters())
        for name in self.model.adapter_names:
            params[name].requires_grad_(name in trainable)

    def trainable_names(self) -> list[str]:
        """State-dict keys (relative to this module) of the parameters being trained."""
        assert self.model is not None
        return [STATE_PREFIX + clean_name(n) for n, p in self.model.named_parameters() if p.requires_grad]

    def to(self, *args: Any, **kwargs: Any) -> LitAdapterModule:
        """Move/cast as nn.Module does, but keep trainable parameters in float32 (see the module docstring)."""
        keep = {p: p.data for p in self.parameters() if p.requires_grad and p.dtype == torch.float32}
        super().to(*args, **kwargs)
        for param, data in keep.items():
            if param.dtype != torch.float32:
                param.data = data.to(param.device)
        trainable_to_float32(self)
        return self

    def forward(
        self, input_ids: torch.Tensor, images: Optional[torch.Tensor] = None, has_image: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return self.model(input_ids, images=images, has_image=has_image)

    def loss_sums(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token losses, number of supervised tokens) of a batch; no full logits (see training/loss.py)."""
        assert self.model is not None
        hidden = self.model(
            batch["input_ids"], images=batch.get("images"), has_image=batch.get("has_image"), hidden_only=True
        )
        return head_cross_entropy(hidden, self.model.llama.output, batch["labels"])

    # ---- training ----

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        source = batch_source(batch)
        self._window_sources.add(source)
        total, count = self.loss_sums(batch)
        loss = total / count.clamp(min=1)
        self._check_finite(loss)
        self._tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log(f"train_{source}_loss", loss, batch_size=batch["input_ids"].shape[0])
        return loss

    def _check_finite(self, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()))
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        callback = self.trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        raise LitAdapterError(
            f"step {self.global_step}: the training loss is {loss.item()}; training stopped and {kept} "
            "(lower the learning rate or check the data, then resume with --ckpt_path last)"
        )

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

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = decay_groups(self.model.named_parameters(), hp.weight_decay)
        if not groups:
            raise LitAdapterError("no trainable parameters: check the adapter config and `trainable`")
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas))
        initialise_adamw_state(optimizer)
        total = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, -(-self.trainer.num_training_batches // self.trainer.accumulate_grad_batches))
        if self.trainer.num_training_batches == float("inf"):
            steps_per_epoch = total
        warmup = resolve_warmup_steps(hp.warmup_steps, hp.warmup_epochs, steps_per_epoch, total)
        scheduler = warmup_cosine(optimizer, warmup, total, hp.min_lr / hp.learning_rate if hp.learning_rate else 0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        check_ddp_settings(self)
        check_routing(self)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._batch_start is not None:
            self._train_seconds += time.perf_counter() - self._batch_start
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        self.log("tokens_per_sec", self.tokens_per_second())
        self.log("peak_memory_gb", peak_memory_gb(self.device))

    def tokens_per_second(self) -> float:
        """Input tokens (padding excluded) per second of training step, summed over all processes."""
        return self._tokens * self.trainer.world_size / self._train_seconds if self._train_seconds else 0.0

    # ---- validation ----

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        source = self._val_source(dataloader_idx) or batch_source(batch)
        total, count = self.loss_sums(batch)
        sums = self._val_sums.setdefault(source, [0.0, 0.0])
        sums[0] += float(total)
        sums[1] += float(count)

    def _val_source(self, dataloader_idx: int) -> Optional[str]:
        """The source of a validation loader, as the joint data module lists them (images alone do not tell: ScienceQA
        instruction batches carry images too)."""
        sources = getattr(self.trainer.datamodule, "val_sources", None)
        return sources[dataloader_idx] if sources and dataloader_idx < len(sources) else None

    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def on_validation_epoch_end(self) -> None:
        """Token-weighted mean loss over the whole validation set(s), reduced over all processes."""
        losses = {}
        for source in (INSTRUCTION, CAPTION):
            sums = torch.tensor(self._val_sums.get(source, [0.0, 0.0]), dtype=torch.float64, device=self.device)
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            if sums[1] > 0:
                losses[source] = sums
        if not losses:
            return
        total = sum(losses.values())
        val_loss = float(total[0] / total[1])
        if self.trainer.sanity_checking:
            self.initial_val_loss = val_loss
            if self.trainer.is_global_zero:
                parts = ", ".join(f"{source} {float(s[0] / s[1]):.4f}" for source, s in losses.items())
                limit = self.trainer.num_sanity_val_steps
                scope = "" if limit == float("inf") else f"; first {limit} batches of each set"
                print(f"validation loss before training: {val_loss:.4f} ({parts}{scope})", flush=True)
            return
        self.last_val_loss = val_loss
        self.log("val_loss", val_loss, prog_bar=True, sync_dist=False)
        for source, sums in losses.items():
            self.log(f"val_{source}_loss", float(sums[0] / sums[1]), sync_dist=False)

    # ---- checkpoints ----

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trainable tensors (the frozen base is rebuilt from checkpoint_dir)."""
        keep = set(self.trainable_names())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["adapter_config"] = self.adapter_config.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:  # (under FSDP the strategy has loaded and checked it already)
            self.check_trainable_keys(checkpoint["state_dict"].keys())

    def check_trainable_keys(self, keys: Iterable[str], source: str = "the checkpoint") -> None:
        present = set(keys)
        missing = [k for k in self.trainable_names() if k not in present]
        if missing:
            raise LitAdapterError(
                f"{source} lacks {len(missing)} trainable tensors (first: {missing[0]!r}); it was written for "
                "a different adapter config"
            )

    # ---- the end of fit ----

    def on_fit_end(self) -> None:
        if self.hparams.export_adapter and not self.trainer.interrupted:
            out_dir = Path(self.trainer.default_root_dir)
            self.export(out_dir)
        self.trainer.strategy.barrier()
        if self.trainer.is_global_zero:
            print(self.summary(), flush=True)

    def export(self, out_dir: Path) -> None:
        """adapter.safetensors + adapter_config.yaml, the tokenizer and model config of the base, and a note of the
        base folder, in out_dir (global rank 0 writes)."""
        from lit_adapter.adapters.io import write_adapter

        tensors = self._adapter_tensors()
        if not self.trainer.is_global_zero:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        write_adapter(out_dir, self.adapter_config, tensors, load_config(self.base_dir))
        for name in (TOKENIZER_FILE, CONFIG_FILE):
            shutil.copyfile(self.base_dir / name, out_dir / name)
        save_yaml({"checkpoint_dir": str(self.base_dir.resolve()), **self.run_figures()}, out_dir / "training.yaml")
        self.exported_to = out_dir

    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor (trained or not), full size, on CPU; a collective call under FSDP."""
        if not self._sharded():
            return {name: t.detach().cpu() for name, t in self.model.adapter_state_dict().items()}
        from lit_adapter.training.fsdp import gather_full_tensors

        names = {STATE_PREFIX + name for name in self.model.adapter_names}
        gathered = gather_full_tensors(self.trainer.strategy.model, names, rank0_only=True)
        return {name.removeprefix(STATE_PREFIX): tensor for name, tensor in gathered.items()}

    def run_figures(self) -> dict[str, Any]:
        return {
            "trainable_parameters": dict(self.group_sizes),
            "optimizer_steps": int(self.global_step),
            "tokens_per_second": round(self.tokens_per_second(), 1),
            "peak_memory_gb": round(peak_memory_gb(self.device), 3),
            "val_loss_before": self.initial_val_loss,
            "val_loss_after": self.last_val_loss,
        }

    def summary(self) -> str:
        return format_summary(self.run_figures(), self.exported_to)
