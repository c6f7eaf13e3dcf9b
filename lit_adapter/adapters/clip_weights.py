"""Reading a local open_clip image-tower weights file (a full CLIP state dict, an image-tower-only one, or a
TorchScript archive as OpenAI released them) into a built tower, with one-line errors."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from lit_adapter.adapters.clip import load_open_clip
from lit_adapter.errors import LitAdapterError, first_line


def is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name == "constants.pkl" or name.endswith("/constants.pkl") for name in archive.namelist())


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit's deprecation notice
                return torch.jit.load(str(path), map_location="cpu").state_dict()
        state = load_open_clip().factory.load_state_dict(str(path))
    except Exception as err:  # torch/safetensors raise many types for unreadable files
        raise LitAdapterError(f"cannot read CLIP weights {path}: {first_line(err)}") from err
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_image_tower(model: nn.Module, path: Path, clip_model: str) -> None:
    """Loads the image tower's tensors from a full CLIP state dict (`visual.*`) or an image-tower-only one."""
    from open_clip.model import resize_pos_embed

    state = _read_weights(path)
    if not any(key.startswith("visual.") for key in state):
        state = {f"visual.{key}": value for key, value in state.items()}
    resize_pos_embed(state, model)
    visual = {key[len("visual.") :]: value for key, value in state.items() if key.startswith("visual.")}
    try:
        missing, unexpected = model.visual.load_state_dict(visual, strict=False)
    except RuntimeError as err:
        reason = _first_mismatch(err)
        raise LitAdapterError(f"CLIP weights {path} do not fit open_clip model {clip_model!r}: {reason}") from err
    if missing or unexpected:
        raise LitAdapterError(
            f"CLIP weights {path} do not fit open_clip model {clip_model!r}: "
            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]} (check clip_model)"
        )


def _first_mismatch(err: RuntimeError) -> str:
    lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
    return lines[0] if lines else first_line(err)
