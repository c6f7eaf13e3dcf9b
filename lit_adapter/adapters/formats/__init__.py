"""Adapter files: ours (`ours.py`: adapter.safetensors + adapter_config.yaml), the official releases
(`official.py`: V1, V2, 65B; `imagebind.py`: ImageBind-LLM) and other tools' (`peft.py`: PEFT ADAPTION_PROMPT and
LORA folders; `litgpt.py`: LitGPT's lit_model.pth.adapter / .adapter_v2), all read into an `AdapterFile` whose
tensors carry our names."""

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
    """Read our adapter (a folder or its .safetensors), an official .pth, a PEFT folder or a LitGPT adapter
    checkpoint, for the base model `base_config`.

    The file's own structure is checked here (base model, layers, shapes the file fixes); its tensors are checked
    against the model they go into when loaded (`check_adapter_tensors`).

    Args:
        path: an adapter folder, its adapter.safetensors, an official LLaMA-Adapter .pth, a PEFT adapter folder
            (or its adapter_model.safetensors), a LitGPT lit_model.pth.adapter / .adapter_v2 (or its folder).
        base_config: the base model the adapter is for.
        adapter_len: (official files) the prompt length K when the file does not show it (V1 default 10).
        visual: (official V2 files) the visual config, when its CLIP tower is not ViT-L/14 from OpenAI;
            (ImageBind-LLM files) where its `encoder_weights` are.
    """
    path = Path(path)
    foreign = read_foreign(path, base_config)
    if foreign is not None:
        foreign.config.check_model(base_config)
        return foreign
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


def read_foreign(path: Path, base_config: ModelConfig) -> Optional[AdapterFile]:
    """A PEFT folder or a LitGPT adapter checkpoint read into our names; None for any other path."""
    from lit_adapter.adapters.formats import litgpt, peft

    folder = peft.peft_folder(path) if path.exists() else None
    if folder is not None:
        return peft.read(folder, base_config)
    checkpoint = litgpt.adapter_checkpoint(path) if path.exists() else None
    if checkpoint is not None:
        return litgpt.read(checkpoint, base_config)
    return None
