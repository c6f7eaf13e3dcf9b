"""FSDP for adapter training on a large frozen LLaMA (13B, 65B): shard the model over the GPUs.

- Each LLaMA `Block` is its own FSDP unit (auto-wrap); `use_orig_params=True` because frozen and trainable
  parameters share units.
- The model is built on the meta device; FSDP materialises one unit at a time and shards it; then the base weights
  (and an `init_adapter`) are copied in unit by unit, so no process ever holds the whole model.
- Precision: torch's FSDP (v1) flattens each unit into one tensor, which needs one dtype per unit, so frozen bf16
  weights and float32 trainable ones cannot share a block. Parameters are therefore STORED in float32 (sharded:
  65B over 8 GPUs is 32.5 GB per GPU), gathered and computed in `compute_dtype` (bf16), and gradients are reduced in
  float32: trainable parameters and AdamW state are float32. Run it with `trainer.precision: 32-true`.
- The frozen encoder (the CLIP tower, or ImageBind for ImageBind-LLM) is not sharded (FSDP ignores it); it is built
  on CPU from its own weights and cast to the compute dtype.
- Checkpoints gather only the trainable tensors (unit by unit), not the whole model.
- Works on CPU too (gloo), which is how it is tested.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch
from lightning.pytorch.strategies import FSDPStrategy
from safetensors import safe_open
from torch import nn

from lit_adapter.adapters import AdapterModel
from lit_adapter.adapters.linear import base_bias_keys
from lit_adapter.checkpoint import WEIGHTS_FILE, load_config
from lit_adapter.devices import default_dtype
from lit_adapter.errors import LitAdapterError
from lit_adapter.model import Block
from lit_adapter.training.names import STATE_PREFIX, clean_name


class AdapterFSDPStrategy(FSDPStrategy):
    """FSDP with per-block wrapping, original parameters, fp32 storage and bf16 compute (see the module docstring).

    Args:
        compute_dtype: dtype of the gathered parameters and of the computation: bfloat16, float16 or float32
        activation_checkpointing: recompute each block's activations in backward (less memory, ~30% more compute)
        sharding_strategy: FULL_SHARD, SHARD_GRAD_OP, NO_SHARD or HYBRID_SHARD
        cpu_offload: keep the parameter shards in CPU memory
        process_group_backend: nccl on GPUs (default), gloo on CPU
    """

    def __init__(
        self,
        compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
        activation_checkpointing: bool = False,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD",
        cpu_offload: bool = False,
        process_group_backend: Optional[str] = None,
    ) -> None:
        from torch.distributed.fsdp import MixedPrecision

        dtype = getattr(torch, compute_dtype)
        super().__init__(
            auto_wrap_policy={Block},
            activation_checkpointing_policy={Block} if activation_checkpointing else None,
            use_orig_params=True,
            # no module class kept out of mixed precision: torch's default (batch norms) would hook every batch norm,
            # those of the ignored frozen encoders too (ImageBind's point trunk), to cast inputs to float32 while
            # their weights are in the compute dtype; the LLaMA blocks have none
            mixed_precision=MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32, buffer_dtype=dtype,
                                           _module_classes_to_ignore=()),
            sharding_strategy=sharding_strategy,
            cpu_offload=cpu_offload,
            state_dict_type="full",
            process_group_backend=process_group_backend,
        )
        self.compute_dtype = dtype

    def setup(self, trainer: Any) -> None:
        precision = getattr(self.precision_plugin, "precision", "32-true")
        if precision != "32-true":
            raise LitAdapterError(
                f"trainer.precision={precision!r} with AdapterFSDPStrategy: use 32-true (parameters are stored in "
                f"float32 and sharded; strategy compute_dtype={str(self.compute_dtype).removeprefix('torch.')} "
                "sets the compute precision)"
            )
        super().setup(trainer)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        ignored = frozen_encoders(model)
        cpu = self.root_device.type == "cpu"  # torch's FSDP runs on CPU only when told the device explicitly
        with warnings.catch_warnings():
            # units mixing frozen and trainable parameters are the point here (use_orig_params=True)
            warnings.filterwarnings("ignore", message="(?s).*has both parameters with requires_grad=True and False")
            wrapped = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=self.root_device if cpu else self.root_device.index,
                ignored_states=ignored or None,
                **self.kwargs,
            )
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        for encoder in ignored:
            encoder.to(device=self.root_device, dtype=self.compute_dtype)
        after_sharding = getattr(model, "after_sharding", None)
        if callable(after_sharding):
            after_sharding(wrapped)
        return wrapped

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Check the checkpoint's tensors against this adapter first (Lightning's FSDP loads them straight into the
        model, before the module's on_load_checkpoint sees the checkpoint)."""
        path = self.broadcast(checkpoint_path)
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("state_dict", {})
        self.lightning_module.check_trainable_keys(state.keys(), origin=str(path))
        return super().load_checkpoint(path, weights_only)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Lightning's full optimizer state, except that on CPU nothing is "offloaded": there torch's offload is a
        no-op `.cpu()` that leaves every state (exp_avg, exp_avg_sq) a view of one reused gather buffer."""
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import (
            FullOptimStateDictConfig,
            FullStateDictConfig,
            OptimStateKeyType,
            StateDictType,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        offload = self.root_device.type != "cpu"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # FSDP.state_dict_type's deprecation notice
            with FSDP.state_dict_type(
                self.model,
                StateDictType.FULL_STATE_DICT,
                FullStateDictConfig(offload_to_cpu=offload and self.world_size > 1, rank0_only=True),
                FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True),
            ):
                state = FSDP.optim_state_dict(self.model, optimizer)
                if self.global_rank == 0:
                    state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Only the trainable tensors, gathered unit by unit onto global rank 0 (other ranks get an empty dict)."""
        module = self.lightning_module
        names = set(module.trainable_names())
        return gather_full_tensors(self.model, names, rank0_only=True)


def frozen_encoders(model: nn.Module) -> list[nn.Module]:
    """The frozen encoders FSDP leaves alone: open_clip towers and ImageBind (every process holds a full copy)."""
    from lit_adapter.adapters.visual import ClipEncoder
    from lit_adapter.encoders.imagebind import ImageBind

    return [module for module in model.modules() if isinstance(module, (ClipEncoder, ImageBind))]


def own_parameters(unit: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters an FSDP unit manages itself (not those of nested units), named relative to the unit."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    def visit(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in module.named_parameters(recurse=False):
            yield prefix + name, param
        for name, child in module.named_children():
            if not isinstance(child, FullyShardedDataParallel):
                yield from visit(child, f"{prefix}{name}.")

    yield from visit(unit.module, "")


def _units(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    for name, module in root.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            yield name, module


def _full(prefix: str, name: str) -> str:
    return clean_name(f"{prefix}.{name}" if prefix else name)


def gather_full_tensors(root: nn.Module, names: set[str], rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Full CPU copies of the named parameters (names as in the unwrapped module), one FSDP unit at a time."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    out: dict[str, torch.Tensor] = {}
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    sharded = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    for prefix, unit in _units(root):
        wanted = [(n, p) for n, p in own_parameters(unit) if _full(prefix, n) in names]
        if not wanted:
            continue
        context = FullyShardedDataParallel.summon_full_params(
            unit, recurse=False, writeback=False, rank0_only=rank0_only, offload_to_cpu=sharded
        )
        with context:
            if rank == 0 or not rank0_only:
                for name, param in wanted:
                    out[_full(prefix, name)] = param.detach().clone().cpu()
    return out


def load_full_tensors(root: nn.Module, tensors: Any) -> set[str]:
    """Copy full tensors (a mapping name -> tensor, or a lazy reader with `keys()` / `[name]`) into the sharded
    parameters of the same names, one FSDP unit at a time. Returns the names loaded."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    loaded: set[str] = set()
    available = set(tensors.keys())
    for prefix, unit in _units(root):
        wanted = [(n, p) for n, p in own_parameters(unit) if _full(prefix, n) in available]
        if not wanted:
            continue
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=True), torch.no_grad():
            for name, param in wanted:
                full = _full(prefix, name)
                param.copy_(tensors[full])
                loaded.add(full)
    return loaded


class PrefixedTensors:
    """A safetensors file seen with `prefix` before every key (read lazily, one tensor at a time); `renamed` maps
    a parameter name to the prefixed file key it loads from where the two differ (`base_bias_keys`)."""

    def __init__(self, handle: Any, prefix: str, renamed: Optional[dict[str, str]] = None) -> None:
        self.handle, self.prefix = handle, prefix
        self.renamed = renamed or {}
        self.parameter_names = {key: name for name, key in self.renamed.items()}

    def keys(self) -> list[str]:
        return [self.parameter_names.get(self.prefix + key, self.prefix + key) for key in self.handle.keys()]

    def file_key(self, name: str) -> str:
        return self.renamed.get(name, name).removeprefix(self.prefix)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.handle.get_tensor(self.file_key(key))


def prepare_for_sharding(model: AdapterModel) -> AdapterModel:
    """A model built on the meta device, made ready for FSDP, which materialises and shards the units (then
    `load_after_sharding` copies the weights in): tied embeddings get real storage, the frozen encoder (CLIP tower or
    ImageBind) is built on CPU with its weights (FSDP ignores it)."""
    llama = model.llama
    if llama.config.tie_embeddings:
        # FSDP's meta-device materialisation makes a new tensor per module and would untie the classifier from
        # the embedding: give the pair real (uninitialised) storage now; the weights are loaded after sharding
        llama.tok_embeddings.to_empty(device="cpu")
        llama.output.weight = llama.tok_embeddings.weight
    if model.visual is not None:
        from lit_adapter.encoders import build_encoder

        with torch.device("cpu"), default_dtype(torch.float32):
            model.visual.attach_encoder(build_encoder(model.adapter_config.visual, device="cpu"))
    return model


def load_after_sharding(root: nn.Module, base_dir: Path, init_adapter: Optional[str]) -> None:
    """Copy the base weights (and an initial adapter) into the sharded model, one unit at a time."""
    path = base_dir / WEIGHTS_FILE
    with safe_open(str(path), framework="pt", device="cpu") as f:
        # a base linear's own bias (Qwen2, Falcon) is `base_bias` in an adapted linear, whose `bias` is the adapter's
        tensors = PrefixedTensors(f, STATE_PREFIX + "llama.", base_bias_keys(root, clean_name))
        loaded = load_full_tensors(root, tensors)
        missing = [tensors.file_key(k) for k in tensors.keys() if k not in loaded]
    if missing:
        raise LitAdapterError(f"{path}: weight {missing[0]!r} has no place in the sharded model")
    if init_adapter:
        from lit_adapter.adapters.formats import check_adapter_tensors, read_adapter
        from lit_adapter.adapters.model import adapter_shapes

        base = load_config(base_dir)
        adapter = read_adapter(init_adapter, base)
        check_adapter_tensors(adapter, adapter_shapes(base, adapter.config))  # (the sharded model has no shapes)
        load_full_tensors(root, {STATE_PREFIX + k: v for k, v in adapter.tensors.items()})
