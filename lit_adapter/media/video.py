"""Video as ImageBind takes it (official `load_and_transform_video_data`, PyAV decoding): [15, 3, 2, 224, 224].

5 clips of 2 s (`clips.clip_spans`); each: the frames whose timestamp lies in [start, end), 0-255 floats
[3, T, H, W]; two frames uniformly subsampled (indices linspace(0, T - 1, 2): the first and the last); / 255;
shorter side scaled to 224 (bilinear, align_corners False, the long side floor(long / short * 224)); CLIP
mean/std per channel; then 3 crops of 224 along the long side (start, centre ceil((L - 224) / 2), end).
Clip-major, then crop.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lit_adapter.errors import LitAdapterError, first_line
from lit_adapter.media.clips import clip_spans
from lit_adapter.media.vision import CLIP_MEAN, CLIP_STD, SIZE

CLIP_SECONDS, CLIPS, FRAMES, CROPS = 2, 5, 2, 3


def read_video(path: Path) -> tuple[list[Fraction], np.ndarray, float]:
    """(frame times in seconds, frames [N, H, W, 3] uint8 RGB, duration in seconds) of the first video stream."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise LitAdapterError(f"{path}: no video stream in this file")
            stream = container.streams.video[0]
            times, frames = [], []
            for frame in container.decode(stream):
                times.append(Fraction(frame.pts) * stream.time_base)
                frames.append(frame.to_ndarray(format="rgb24"))
            duration = float(stream.duration * stream.time_base) if stream.duration else container.duration / 1e6
    except (av.error.FFmpegError, OSError, ValueError, TypeError) as err:
        raise LitAdapterError(f"{path}: cannot read video ({first_line(err)}); pass an mp4 or other video") from None
    if not frames:
        raise LitAdapterError(f"{path}: the video stream holds no frames")
    return times, np.stack(frames), duration


def short_side_scale(clip: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """[C, T, H, W] -> shorter side `size`, bilinear (pytorchvideo's ShortSideScale)."""
    height, width = clip.shape[-2:]
    if width < height:
        shape = (int(math.floor(height / width * size)), size)
    else:
        shape = (size, int(math.floor(width / height * size)))
    return F.interpolate(clip, size=shape, mode="bilinear", align_corners=False)


def crop_boxes(height: int, width: int, size: int = SIZE) -> list[tuple[int, int]]:
    """(top, left) of the 3 crops: start, centre, end of the long side (pytorchvideo's uniform_crop)."""
    top, left = math.ceil((height - size) / 2), math.ceil((width - size) / 2)
    if height > width:
        return [(0, left), (top, left), (height - size, left)]
    return [(top, 0), (top, left), (top, width - size)]


def clip_tensor(frames: np.ndarray) -> torch.Tensor:
    """Frames [T, H, W, 3] uint8 -> the normalised, scaled two-frame clip [3, 2, H', W']."""
    clip = torch.from_numpy(frames).permute(3, 0, 1, 2).float()  # [3, T, H, W], 0-255
    index = torch.linspace(0, clip.shape[1] - 1, FRAMES).clamp(0, clip.shape[1] - 1).long()
    clip = short_side_scale(clip[:, index] / 255.0)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    return (clip - mean) / std


def load_video(path: Path) -> torch.Tensor:
    times, frames, duration = read_video(path)
    out = []
    for start, end in clip_spans(duration, CLIP_SECONDS, CLIPS):
        chosen = [i for i, t in enumerate(times) if start <= t < end]
        if not chosen:
            raise LitAdapterError(f"{path}: no frames between {float(start):.2f} s and {float(end):.2f} s")
        clip = clip_tensor(frames[chosen])
        for top, left in crop_boxes(*clip.shape[-2:]):
            out.append(clip[..., top: top + SIZE, left: left + SIZE])
    return torch.stack(out)
