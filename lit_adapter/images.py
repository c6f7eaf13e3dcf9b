"""Reading image files for data, inference and evaluation: one-line errors naming the file for a missing or
unreadable image."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Union

import torch
from PIL import Image

from lit_adapter.errors import LitAdapterError, first_line


def open_image(path: Path) -> Image.Image:
    """The image at `path` as RGB, fully decoded (a truncated file fails here, not later)."""
    path = Path(path)
    if not path.is_file():
        raise LitAdapterError(f"{path}: image not found")
    return decode_rgb(path, f"{path}: cannot read image", "pass a PNG, JPEG or other PIL-readable file")


def decode_rgb(source: Union[Path, bytes], failure: str, advice: str) -> Image.Image:
    """A file or its bytes as an RGB image, fully decoded; a damaged one is `{failure} (why); {advice}`."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.convert("RGB")
    # PIL's decoders fail in many ways on a damaged body (OSError, ValueError, SyntaxError, struct and zlib errors,
    # DecompressionBombError): all of them mean this file cannot be used
    except Exception as err:
        raise LitAdapterError(f"{failure} ({first_line(err)}); {advice}") from None


def load_image(path: Path, transform: Callable) -> torch.Tensor:
    """One image through `transform` (e.g. the CLIP transform): [3, H, W]."""
    return transform(open_image(path))


def check_image(path: Path) -> Path:
    """Fail early, with the file's name, when an image is missing or corrupt."""
    open_image(path)
    return Path(path)


def load_images(
    paths: Sequence[Path], transform: Callable, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Images through `transform`, stacked into [B, 3, H, W]."""
    tensors = [load_image(path, transform) for path in paths]
    return torch.stack(tensors).to(device=device, dtype=dtype)
