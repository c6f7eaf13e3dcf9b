"""LLaMA-Adapter V1 and V2 on a frozen LLaMA: prompts with zero-init gates, bias/scale, LoRA, visual prompts.

`build_adapter_model(base, config)` attaches the adapters at the base model's seams (`Attention.adaption_prompt`, the linear
modules, the norms) and freezes everything else; `load_adapter_model(checkpoint_dir, adapter)` does the same from
files (ours or the official releases, see `io.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from lit_adapter.adapters.config import AdapterConfig
from lit_adapter.adapters.linear import AdaptedLinear, attach_linears
from lit_adapter.adapters.prompt import GatedPrompt, attach_prompts
from lit_adapter.adapters.visual import VisualAdapter, VisualConfig
from lit_adapter.config import ModelConfig
from lit_adapter.errors import LitAdapterError
from lit_adapter.model import LLaMA, RMSNorm

__all__ = [
    "AdapterConfig",
    "AdapterModel",
    "VisualConfig",
    "attach_adapters",
    "build_adapter_model",
    "load_adapter_model",
]


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
        self.reset_adapter_parameters()


def attach_adapters(llama: LLaMA, config: AdapterConfig) -> None:
    """Freeze `llama` and attach the language-side adapters (prompts, bias/scale, LoRA); norms unfrozen if asked."""
    config.check_model(llama.config)
    llama.requires_grad_(False)
    attach_linears(llama, config)
    attach_prompts(llama, config)
    for module in llama.modules():
        if isinstance(module, (GatedPrompt, AdaptedLinear)):
            for name, param in module.named_parameters(recurse=False):
                param.requires_grad_(name != "weight")
        elif isinstance(module, RMSNorm) and config.train_norms:
            module.weight.requires_grad_(True)


def build_adapter_model(base: LLaMA, config: AdapterConfig, load_clip: bool = True) -> AdapterModel:
    """Attach the adapters of `config` to `base` (in place) and freeze everything that is not trainable.

    A base on the meta device gets its visual adapter without the CLIP tower (attach it after `to_empty`), and so
    does `load_clip=False`.
    """
    attach_adapters(base, config)
    visual = None
    if config.visual is not None:
        device = base.tok_embeddings.weight.device
        with_clip = load_clip and device.type != "meta"
        with torch.device(device):
            visual = VisualAdapter(config.visual, base.config.dim, load_clip=with_clip)
        visual.to(device)
    model = AdapterModel(base, config, visual)
    trainable = {name for name, _ in visual.trainable_parameters()} if visual is not None else set()
    if visual is not None:
        for name, param in visual.named_parameters():
            param.requires_grad_(name in trainable)
    model.adapter_names = [name for name, param in model.named_parameters() if param.requires_grad]
    return model


def load_adapter_model(
    checkpoint_dir: Union[str, Path],
    adapter: Optional[Union[str, Path]] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
) -> tuple[AdapterModel, AdapterConfig]:
    """The base model of `checkpoint_dir` with `adapter` (our folder/file or an official .pth) attached.

    Without an adapter, the plain model wrapped as an AdapterModel with no adapters.
    """
    from lit_adapter.adapters.io import load_adapter
    from lit_adapter.checkpoint import load_model

    base = load_model(checkpoint_dir, device=device, dtype=dtype)
    if adapter is None:
        model = build_adapter_model(base, AdapterConfig(adapter_layers=0))
    else:
        model = load_adapter(base, adapter)
    model.to(device)
    return model.eval(), model.adapter_config
