"""AdapterModel: a frozen LLaMA with the adapters attached at its seams; the one way to build and to load it.

- `attach_adapters(llama, config)`: attach the adapters of `config` to an existing LLaMA, in place (the seams:
  `Attention.adaption_prompt`, the linear modules, the norms) and freeze everything else.
- `build_adapter_model(checkpoint_dir, config, device, dtype)`: the build every caller uses (training, FSDP's meta
  path, inference, evaluation): the base on the meta device, its weights assigned once, the adapters attached.
- `load_adapter_model(checkpoint_dir, adapter)`: read the adapter file, build once from its config, load its tensors
  with one strict check whose errors name the file's own keys. `load_adapter(model, path)` does the same onto an
  existing model.

dtype policy: every adapter parameter is float32, whatever dtype the frozen base has (trained norms, which start
as the base's own weights, are made float32 too); each is cast to the activations' dtype where it is used.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from lit_adapter.adapters.config import AdapterConfig
from lit_adapter.adapters.formats import AdapterFile, check_adapter_tensors, read_adapter
from lit_adapter.adapters.linear import AdaptedLinear, attach_linears
from lit_adapter.adapters.prompt import GatedPrompt, attach_prompts
from lit_adapter.adapters.visual import VisualAdapter, VisualConfig
from lit_adapter.checkpoint import load_config, load_model, meta_model
from lit_adapter.config import ModelConfig
from lit_adapter.devices import default_dtype
from lit_adapter.errors import LitAdapterError
from lit_adapter.model import NORMS, LLaMA

PathLike = Union[str, Path]
NORM_MODULES = tuple(NORMS.values())


class AdapterModel(nn.Module):
    """A frozen LLaMA (`llama`) with adapters attached at its seams, plus an optional `visual` adapter.

    `adapter_names` lists the parameters the adapter owns (what training updates and `save_adapter` writes).
    """

    def __init__(self, llama: LLaMA, adapter_config: AdapterConfig, visual: Optional[VisualAdapter] = None) -> None:
        super().__init__()
        self.llama = llama
        self.visual = visual
        self.adapter_config = adapter_config
        self.adapter_names: list[str] = []

    @property
    def config(self) -> ModelConfig:
        """The base model's config (so generation code can treat an AdapterModel like a LLaMA)."""
        return self.llama.config

    def forward(
        self,
        input_ids: torch.Tensor,
        images: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        visual_tokens: Optional[torch.Tensor] = None,
        has_image: Optional[torch.Tensor] = None,
        **llama_kwargs,
    ) -> torch.Tensor:
        """Logits [B, T, vocab]. `images` [B, 3, H, W] are encoded into visual tokens; `visual_tokens` passes
        already encoded visual tokens (e.g. once per generation). `has_image` [B] (bool): rows marked False get no
        visual prompt, exactly as if run without an image (their `images` rows are placeholders)."""
        if images is not None:
            visual_tokens = self.encode_images(images, has_image)
        return self.llama(input_ids, input_pos=input_pos, visual_tokens=visual_tokens, mask=mask, **llama_kwargs)

    def encode_images(self, images: torch.Tensor, has_image: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images [B, 3, H, W] -> visual tokens [B, visual_len or 1, dim]; rows where `has_image` is False get
        all-zero tokens, which the prompts treat as "no image" (see `GatedPrompt`)."""
        if self.visual is None:
            raise LitAdapterError("this adapter has no visual encoder: it takes no images (drop the image input)")
        tokens = self.visual(images)
        if has_image is None:
            return tokens
        if has_image.shape != tokens.shape[:1]:
            raise LitAdapterError(f"has_image must have one flag per image: shape {list(has_image.shape)} for "
                                  f"{tokens.shape[0]} images")
        # every row still goes through the encoder, so the visual parameters are used on every batch (DDP)
        keep = has_image.to(device=tokens.device, dtype=torch.bool).view(-1, 1, 1)
        return torch.where(keep, tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))

    def set_kv_cache(self, batch_size: int, max_len: Optional[int] = None, device=None, dtype=None) -> None:
        self.llama.set_kv_cache(batch_size, max_len, device, dtype)

    def clear_kv_cache(self) -> None:
        self.llama.clear_kv_cache()

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        params = dict(self.named_parameters(remove_duplicate=False))
        return {name: params[name] for name in self.adapter_names}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: param.detach() for name, param in self.adapter_parameters().items()}

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every adapter parameter: what an adapter file for this model must hold."""
        return {name: tuple(param.shape) for name, param in self.adapter_parameters().items()}

    def reset_adapter_parameters(self) -> None:
        """Initial adapter values: zero gates, random prompts, bias 0, scale 1, LoRA l2 0, visual default init.

        Trained norms start from the base model's weights, so they are not touched here."""
        for module in self.llama.modules():
            if isinstance(module, (GatedPrompt, AdaptedLinear)):
                module.reset_parameters()
        if self.visual is not None:
            self.visual.reset_parameters()

    def reset_parameters(self) -> None:
        """Random base (as `LLaMA.reset_parameters`) and initial adapters, e.g. after meta-device construction."""
        self.llama.reset_parameters()
        for module in self.llama.modules():
            if isinstance(module, AdaptedLinear) and module.base_bias is not None:
                nn.init.zeros_(module.base_bias)  # as the base's own biases (LLaMA.reset_parameters sees `bias`)
        self.reset_adapter_parameters()


def attach_adapters(llama: LLaMA, config: AdapterConfig, load_clip: bool = True) -> AdapterModel:
    """Attach the adapters of `config` to `llama` (in place) and freeze everything that is not trainable.

    Args:
        llama: the base model, on any device and in any dtype; on the meta device the visual adapter comes without
            its CLIP tower (attach it after `to_empty`), and so it does with `load_clip=False`.
        config: the adapters.
    Returns:
        the AdapterModel around `llama`, its adapter parameters float32 (see the module docstring).
    """
    config.check_model(llama.config)
    llama.requires_grad_(False)
    attach_linears(llama, config)
    attach_prompts(llama, config)
    for module in llama.modules():
        if isinstance(module, (GatedPrompt, AdaptedLinear)):
            for name, param in module.named_parameters(recurse=False):
                param.requires_grad_(name not in AdaptedLinear.FROZEN)
        elif isinstance(module, NORM_MODULES) and config.train_norms:
            module.requires_grad_(True)  # every norm: RMSNorm's weight, LayerNorm's weight and bias, q/k norms
    visual = _visual_adapter(config.visual, llama, load_clip) if config.visual is not None else None
    model = AdapterModel(llama, config, visual)
    model.adapter_names = [name for name, param in model.named_parameters() if param.requires_grad]
    for param in model.adapter_parameters().values():
        if param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()  # trained norms come in the base's dtype
    return model


def _visual_adapter(config: VisualConfig, llama: LLaMA, load_clip: bool) -> VisualAdapter:
    """The visual adapter on the base's device, in float32 (the CLIP tower too); everything but CLIP trainable."""
    device = llama.tok_embeddings.weight.device
    # the visual adapter's modules (torch, timm, open_clip) are created in the default dtype, which a training
    # strategy may have set to the base's bf16
    with torch.device(device), default_dtype(torch.float32):
        visual = VisualAdapter(config, llama.config.dim, load_clip=load_clip and device.type != "meta")
    visual.to(device)
    trainable = {name for name, _ in visual.trainable_parameters()}
    for name, param in visual.named_parameters():
        param.requires_grad_(name in trainable)
    return visual


def build_adapter_model(
    checkpoint_dir: PathLike,
    config: AdapterConfig,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
) -> AdapterModel:
    """The base model of `checkpoint_dir` with the adapters of `config`: the one build of training, inference and
    evaluation.

    Args:
        checkpoint_dir: the base model folder (written by `lit-adapter convert`).
        config: the adapters (initial values: zero gates, see `AdapterModel.reset_adapter_parameters`).
        device: where the weights load; "meta" builds the structure only (no weights, no CLIP tower), for FSDP.
        dtype: the frozen base's dtype (None = the file's); adapter parameters are float32 regardless.
    """
    if isinstance(checkpoint_dir, LLaMA):  # temporary: the old build_adapter_model(base, config) -> attach_adapters
        return attach_adapters(checkpoint_dir, config)
    if torch.device(device).type == "meta":
        llama = meta_model(load_config(checkpoint_dir))
        if dtype is not None:
            llama.to(dtype)
    else:
        llama = load_model(checkpoint_dir, device=device, dtype=dtype)
    return attach_adapters(llama, config)


def load_adapter_model(
    checkpoint_dir: PathLike,
    adapter: Optional[PathLike] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
) -> AdapterModel:
    """The base model of `checkpoint_dir` with `adapter` (our folder/file or an official .pth), in eval mode.

    The file is read first, the model built once from its config, then its tensors are loaded with one strict check.
    Without an adapter, the plain model wrapped as an AdapterModel with no adapters. Its config is
    `model.adapter_config`.
    """
    adapter_file = read_adapter(adapter, load_config(checkpoint_dir)) if adapter is not None else None
    config = adapter_file.config if adapter_file is not None else AdapterConfig(adapter_layers=0)
    model = build_adapter_model(checkpoint_dir, config, device, dtype)
    if adapter_file is not None:
        assign_adapter(model, adapter_file)
    return model.eval()


def load_adapter(
    model: Union[AdapterModel, LLaMA],
    path: PathLike,
    adapter_len: Optional[int] = None,
    visual: Optional[VisualConfig] = None,
) -> AdapterModel:
    """Load an adapter file onto a model: an AdapterModel built with the same config, or a plain LLaMA (the
    adapter is attached to it). `adapter_len`, `visual`: as in `read_adapter`. Returns the AdapterModel."""
    adapter = read_adapter(path, model.config, adapter_len, visual)
    if isinstance(model, AdapterModel):
        check_same_config(model.adapter_config, adapter.config, adapter.path)
    else:
        model = attach_adapters(model, adapter.config)
    assign_adapter(model, adapter)
    return model


def assign_adapter(model: AdapterModel, adapter: AdapterFile) -> None:
    """Copy the file's tensors into the model's adapter parameters, after the one strict check."""
    params = model.adapter_parameters()
    check_adapter_tensors(adapter, model.adapter_shapes())
    with torch.no_grad():
        for name, tensor in adapter.tensors.items():
            params[name].copy_(tensor)


def adapter_shapes(base: ModelConfig, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """The adapter tensors `config` has on `base`, where no model is at hand (e.g. `merge`): a meta-device build."""
    return attach_adapters(meta_model(base), config, load_clip=False).adapter_shapes()


def check_same_config(have: AdapterConfig, got: AdapterConfig, path: Path) -> None:
    """Fail with one line if an adapter file's config differs from the model's (visual and prompt style aside)."""
    ignore = ("visual", "prompt_style")
    for field in dataclasses.fields(AdapterConfig):
        if field.name not in ignore and getattr(have, field.name) != getattr(got, field.name):
            raise LitAdapterError(
                f"{path}: {field.name} is {getattr(got, field.name)!r} but the model was built with "
                f"{getattr(have, field.name)!r}; load the adapter onto the plain base model instead"
            )
