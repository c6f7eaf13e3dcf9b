"""Audio as ImageBind takes it (official `load_and_transform_audio_data`): [3, 1, 128, 204] per file.

Decode (PyAV: wav, flac, mp3, ...) to float in [-1, 1], resample to 16 kHz (torchaudio's default sinc resampler),
cut 3 clips of 2 s (start, middle, end; `clips.clip_spans`), and per clip: subtract its mean, 128-bin Kaldi fbank
(torchaudio `compliance.kaldi.fbank`: Hanning window, 25 ms frames, 10 ms shift, no dither, no energy, HTK mel
scale), transpose to [128, frames], right-pad with zeros (or cut) to 204 frames, then normalise with ImageBind's
audio mean and std. A 2 s clip gives 198 frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lit_adapter.errors import LitAdapterError, first_line
from lit_adapter.media.clips import clip_spans

SAMPLE_RATE = 16_000
CLIP_SECONDS, CLIPS = 2, 3
MEL_BINS, TARGET_FRAMES = 128, 204
MEAN, STD = -4.268, 9.138
_SCALES = {np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31, np.dtype(np.uint8): None}


def read_audio(path: Path) -> tuple[torch.Tensor, int]:
    """(waveform [channels, samples] float32 in [-1, 1], sample rate) of the first audio stream."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise LitAdapterError(f"{path}: no audio stream in this file")
            stream = container.streams.audio[0]
            chunks = [_planar(frame) for frame in container.decode(stream)]
            rate = stream.codec_context.sample_rate
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise LitAdapterError(f"{path}: cannot read audio ({first_line(err)}); pass a wav, flac or mp3 file") from None
    if not chunks:
        raise LitAdapterError(f"{path}: the audio stream holds no samples")
    return torch.from_numpy(np.concatenate(chunks, axis=1)), rate


def _planar(frame) -> np.ndarray:
    """One decoded frame as float32 [channels, samples] in [-1, 1] (integer PCM divided by its full scale)."""
    array = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        array = array.reshape(-1, channels).T
    if array.dtype == np.uint8:
        return (array.astype(np.float32) - 128.0) / 128.0
    scale = _SCALES.get(array.dtype)
    return array.astype(np.float32) / scale if scale else array.astype(np.float32)


def resample(waveform: torch.Tensor, rate: int) -> torch.Tensor:
    if rate == SAMPLE_RATE:
        return waveform
    import torchaudio.functional

    return torchaudio.functional.resample(waveform, orig_freq=rate, new_freq=SAMPLE_RATE)


def melspec(clip: torch.Tensor) -> torch.Tensor:
    """One clip [channels, samples] at 16 kHz -> [1, 128, 204] (before the mean/std normalisation).

    The clip's mean is subtracted in place, as the official code does on its view of the whole waveform (so an
    overlapping later clip sees those samples shifted; per-frame DC removal makes this nearly irrelevant)."""
    from torchaudio.compliance import kaldi

    clip -= clip.mean()
    fbank = kaldi.fbank(clip, htk_compat=True, sample_frequency=SAMPLE_RATE, use_energy=False,
                        window_type="hanning", num_mel_bins=MEL_BINS, dither=0.0, frame_length=25,
                        frame_shift=10).T  # [128, frames]
    pad = TARGET_FRAMES - fbank.shape[1]
    fbank = torch.nn.functional.pad(fbank, (0, pad)) if pad > 0 else fbank[:, :TARGET_FRAMES]
    return fbank[None]


def audio_clips(waveform: torch.Tensor) -> torch.Tensor:
    """A 16 kHz waveform [channels, samples] -> [3, 1, 128, 204], normalised."""
    spans = clip_spans(waveform.shape[1] / SAMPLE_RATE, CLIP_SECONDS, CLIPS)
    clips = [melspec(waveform[:, int(start * SAMPLE_RATE): int(end * SAMPLE_RATE)]) for start, end in spans]
    return (torch.stack(clips) - MEAN) / STD


def load_audio(path: Path) -> torch.Tensor:
    waveform, rate = read_audio(path)
    if waveform.shape[1] / rate * SAMPLE_RATE < 400:
        raise LitAdapterError(f"{path}: {waveform.shape[1] / rate:.3f} s of audio is shorter than one 25 ms frame")
    try:
        return audio_clips(resample(waveform, rate))
    except (RuntimeError, ValueError) as err:
        raise LitAdapterError(f"{path}: cannot compute the filterbank ({first_line(err)})") from None
