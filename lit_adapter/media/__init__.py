"""Reading the inputs of every modality from files, preprocessed as ImageBind's official `data.py` does.

One function per modality turns one file into the tensor ImageBind takes for it (`load(modality, path)`); a batch
stacks them. Errors name the file on one line. Decoders are imported on first use: PyAV (`av`) for video and audio,
torchaudio for resampling and Kaldi filterbanks, plyfile and pypcd4 for .ply and .pcd clouds (extra `[imagebind]`).

| modality | files | tensor per file |
|---|---|---|
| vision (image) | jpg, png, ... (PIL) | [3, 224, 224] |
| vision (video) | mp4, ... (PyAV) | [15, 3, 2, 224, 224]: 5 clips x 3 crops |
| audio | wav, flac, mp3, ... (PyAV) | [3, 1, 128, 204]: 3 clips of 2 s |
| depth, thermal | png, ... (PIL), depth also .npy | [1, 224, 224] |
| imu | .npy, .pt [6, 2000] | [6, 2000] |
| point | ply, pcd (ascii, binary, binary_compressed), xyz, txt, pts, npy, pt | [N, 3], centred, unit radius |
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from lit_adapter.errors import LitAdapterError

PathLike = Union[str, Path]
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
# command-line names -> ImageBind modalities (an image and a video both go through the vision trunk)
INPUT_KINDS = ("image", "video", "audio", "depth", "thermal", "imu", "point")


def modality_of(kind: str) -> str:
    return "vision" if kind in ("image", "video") else kind


def loader(kind: str) -> Callable[[Path], torch.Tensor]:
    """The preprocessing of one input kind (see the module table)."""
    if kind == "image":
        from lit_adapter.media.vision import load_image
        return load_image
    if kind == "video":
        from lit_adapter.media.video import load_video
        return load_video
    if kind == "audio":
        from lit_adapter.media.audio import load_audio
        return load_audio
    if kind in ("depth", "thermal"):
        from lit_adapter.media import vision
        return vision.load_depth if kind == "depth" else vision.load_thermal
    if kind == "imu":
        from lit_adapter.media.imu import load_imu
        return load_imu
    if kind == "point":
        from lit_adapter.media.points import load_points
        return load_points
    raise LitAdapterError(f"unknown input kind {kind!r}; choose among {list(INPUT_KINDS)}")


def load(kind: str, path: PathLike) -> torch.Tensor:
    """One file of `kind` as ImageBind's input tensor; an image path that is a video file is read as a video."""
    path = Path(path)
    if not path.is_file():
        raise LitAdapterError(f"{path}: {kind} file not found")
    if kind == "image" and path.suffix.lower() in VIDEO_SUFFIXES:
        kind = "video"
    return loader(kind)(path)


def load_batch(kind: str, paths: Sequence[PathLike]) -> torch.Tensor:
    """Files of one kind stacked into a batch."""
    tensors = [load(kind, path) for path in paths]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise LitAdapterError(f"{kind} inputs of different shapes {sorted(shapes)} cannot be batched; "
                              "pass them one at a time")
    return torch.stack(tensors)
