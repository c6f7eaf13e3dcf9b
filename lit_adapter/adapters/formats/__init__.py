"""Adapter files: ours (`ours.py`: adapter.safetensors + adapter_config.yaml) and the official releases
(`official.py`: V1, V2, 65B; `imagebind.py`: ImageBind-LLM), all read into an `AdapterFile` whose tensors carry
our names."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lit_adapter.adapters.formats import imagebind, official, ours
from lit_adapter.adapters.formats.file import AdapterFile, PathLike, Tensors, check_adapter_tensors
from lit_adapter.adapters.formats.ours import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter, write_adapter
from lit_adapter.adapters.visual import VisualConfig
from lit_adapter.config import ModelConfig
from lit_adapter.errors import LitAdapterError

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterFile",
    "Tensors",
    "check_adapter_tensors",
    "read_adapter",
    "save_adapter",
    "write_adapter",
]


def read_adapter(
    path: PathLike, base_config: ModelConfig, adapter_len: Optional[int] = None, visual: Optional[VisualConfig] = None
) -> AdapterFile:
    """Read our adapter (a folder or its .safetensors) or an official .pth, for the base model `base_config`.

    The file's own structure is checked here (base model, layers, shapes the file fixes); its tensors are checked
    against the model they go into when loaded (`check_adapter_tensors`).

    Args:
        path: an adapter folder, its adapter.safetensors, or an official LLaMA-Adapter .pth.
        base_config: the base model the adapter is for.
        adapter_len: (official files) the prompt length K when the file does not show it (V1 default 10).
        visual: (official V2 files) the visual config, when its CLIP tower is not ViT-L/14 from OpenAI;
            (ImageBind-LLM files) where its `encoder_weights` are.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise LitAdapterError(f"{path}: no {ADAPTER_WEIGHTS} in this folder; pass an adapter folder or file")
        path = path / ADAPTER_WEIGHTS
    if not path.is_file():
        raise LitAdapterError(f"{path}: adapter file not found")
    if path.suffix == ".safetensors":
        adapter = ours.read(path, base_config)
    elif imagebind.is_imagebind_llm(path):
        adapter = imagebind.read(path, base_config, visual)
    else:
        adapter = official.read(path, base_config, adapter_len, visual)
    adapter.config.check_model(base_config)
    return adapter
