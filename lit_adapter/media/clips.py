"""Where the clips of an audio or video file lie: pytorchvideo's `ConstantClipsPerVideoSampler`, as pinned by the
official ImageBind code. `count` clips of `duration` seconds at starts k * max(D - duration, 0) / (count - 1),
computed with exact fractions (as the sampler does), k = 0 .. count - 1."""

from __future__ import annotations

from fractions import Fraction


def clip_spans(total: float, duration: float, count: int) -> list[tuple[Fraction, Fraction]]:
    """[(start, end)] in seconds of the `count` clips of a file `total` seconds long."""
    last_start = Fraction(max(total - duration, 0))
    step = last_start / max(count - 1, 1)
    return [(step * k, step * k + Fraction(duration)) for k in range(count)]
