"""Images (and depth and thermal maps) as ImageBind takes them.

Images: RGB; shorter side resized to 224 (bicubic), centre crop 224, [0, 1], normalised with CLIP's mean and std
(official `load_and_transform_vision_data`). Depth and thermal maps have no loader in the official code; here they
take the same geometry on one channel, with the values as stored (8-bit maps scaled to [0, 1]): convert depth to
disparity and scale thermal images beforehand the way the paper's data was, if that matters for the use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from lit_adapter.errors import LitAdapterError, first_line
from lit_adapter.images import open_image

SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_transform(train: bool = False, size: int = SIZE) -> Callable:
    """PIL image -> [3, size, size]. Eval: the official resize + centre crop; train: ImageBind-LLM's
    RandomResizedCrop(size, scale (0.9, 1.0), ratio (0.75, 1.333), bicubic)."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    geometry = ([T.RandomResizedCrop(size, scale=(0.9, 1.0), ratio=(0.75, 1.3333), interpolation=bicubic)] if train
                else [T.Resize(size, interpolation=bicubic), T.CenterCrop(size)])
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def load_image(path: Path) -> torch.Tensor:
    return image_transform()(open_image(path))


def _map_geometry(x: torch.Tensor) -> torch.Tensor:
    """[1, H, W] -> [1, 224, 224]: shorter side to 224 (bicubic), centre crop."""
    from torchvision.transforms import v2 as T

    return T.CenterCrop(SIZE)(T.Resize(SIZE, interpolation=T.InterpolationMode.BICUBIC, antialias=True)(x))


def read_map(path: Path) -> torch.Tensor:
    """A single-channel map [1, H, W] float32 from an image (8-bit scaled to [0, 1]) or a 2-D .npy array."""
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as image:
                array = np.asarray(image.convert("L") if image.mode in ("RGB", "RGBA", "P", "LA") else image)
    except (OSError, ValueError, SyntaxError) as err:
        raise LitAdapterError(f"{path}: cannot read ({first_line(err)}); pass a PNG/TIFF image or a .npy map") from None
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise LitAdapterError(f"{path}: expected a single-channel map [H, W], got shape {list(array.shape)}")
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    return torch.from_numpy(array.astype(np.float32) / scale)[None]


def load_depth(path: Path) -> torch.Tensor:
    return _map_geometry(read_map(path))


def load_thermal(path: Path) -> torch.Tensor:
    return _map_geometry(read_map(path))
