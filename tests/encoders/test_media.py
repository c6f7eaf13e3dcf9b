"""Preprocessing from files, as the official ImageBind `data.py` does it, against torchaudio / torchvision / PyAV
called directly and hand-computed clip spans, crop boxes and point normalisation."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lit_adapter import media
from lit_adapter.errors import LitAdapterError
from lit_adapter.media.clips import clip_spans
from lit_adapter.media.points import normalize_points
from lit_adapter.media.video import crop_boxes
from tests.encoders.helpers import write_pcm16

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def write_sine(path, seconds: float, rate: int = 16000, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    samples = np.round(12000 * np.sin(2 * np.pi * hz * t) + 800 * np.sin(2 * np.pi * 3 * t)).astype(np.int16)
    write_pcm16(path, samples, rate)
    return samples


def reference_audio(samples: np.ndarray, spans: list[tuple[int, int]]) -> torch.Tensor:
    """torchaudio's Kaldi fbank on each clip (its mean removed in place on the shared waveform), padded to 204,
    then (x + 4.268) / 9.138."""
    from torchaudio.compliance import kaldi

    waveform = torch.from_numpy(samples.astype(np.float32) / 32768)[None]
    clips = []
    for a, b in spans:
        clip = waveform[:, a:b]
        clip -= clip.mean()
        fbank = kaldi.fbank(clip, htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
                            num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10)
        assert fbank.shape == (198, 128)  # a 2 s clip: 1 + (32000 - 400) // 160 frames
        clips.append(F.pad(fbank.T, (0, 6))[None])
    return (torch.stack(clips) + 4.268) / 9.138


def test_clip_spans_by_hand():
    assert clip_spans(3.0, 2, 3) == [(0, 2), (Fraction(1, 2), Fraction(5, 2)), (1, 3)]
    assert clip_spans(1.5, 2, 3) == [(0, 2)] * 3  # shorter than a clip: three clips from the start
    assert [float(s) for s, _ in clip_spans(3.0, 2, 5)] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_a_sine_wav_gives_torchaudio_s_fbank_of_the_three_clips(tmp_path):
    samples = write_sine(tmp_path / "sine.wav", 3.0)
    out = media.load("audio", tmp_path / "sine.wav")
    assert out.shape == (3, 1, 128, 204)
    # 3 s: clips [0, 2], [0.5, 2.5], [1, 3] s -> samples [0, 32000), [8000, 40000), [16000, 48000)
    expected = reference_audio(samples, [(0, 32000), (8000, 40000), (16000, 48000)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[..., 198:], torch.full_like(out[..., 198:], 4.268 / 9.138))  # the padding


def test_other_rates_are_resampled_with_torchaudio_and_flac_decodes_the_same(tmp_path):
    import av
    import torchaudio.functional

    from lit_adapter.media.audio import audio_clips

    samples = write_sine(tmp_path / "low.wav", 2.5, rate=8000)
    waveform = torch.from_numpy(samples.astype(np.float32) / 32768)[None]
    expected = audio_clips(torchaudio.functional.resample(waveform, orig_freq=8000, new_freq=16000))
    torch.testing.assert_close(media.load("audio", tmp_path / "low.wav"), expected)
    with av.open(str(tmp_path / "low.flac"), "w") as out:  # lossless: the same samples
        stream = out.add_stream("flac", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None], format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    torch.testing.assert_close(media.load("audio", tmp_path / "low.flac"), expected)


def test_an_unreadable_or_missing_audio_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really a wave file")
    with pytest.raises(LitAdapterError) as err:
        media.load("audio", tmp_path / "bad.wav")
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{tmp_path / 'bad.wav'}: cannot read audio")
    with pytest.raises(LitAdapterError, match="none.wav: audio file not found"):
        media.load("audio", tmp_path / "none.wav")


def write_video(path, width: int, height: int, frames: int = 30, fps: int = 10) -> None:
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            pixels = np.full((height, width, 3), 8 * i, dtype=np.uint8) + rng.integers(0, 40, (height, width, 3),
                                                                                       dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def decoded_frames(path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


def test_crop_boxes_by_hand():
    assert crop_boxes(224, 298) == [(0, 0), (0, 37), (0, 74)]  # landscape: left, centre ceil(74 / 2), right
    assert crop_boxes(299, 224) == [(0, 0), (38, 0), (75, 0)]  # portrait: top, centre ceil(75 / 2), bottom


def test_a_real_mp4_gives_five_clips_of_two_frames_in_three_crops(tmp_path):
    write_video(tmp_path / "clip.mp4", 64, 48)
    out = media.load("video", tmp_path / "clip.mp4")
    assert out.shape == (15, 3, 2, 224, 224)
    frames = decoded_frames(tmp_path / "clip.mp4")
    assert len(frames) == 30
    # 3 s at 10 fps: clip k starts at 0.25 k; its frames have times in [0.25 k, 0.25 k + 2); first and last kept
    chosen = [(0, 19), (3, 22), (5, 24), (8, 27), (10, 29)]
    for k, (first, last) in enumerate(chosen):
        clip = torch.from_numpy(np.stack([frames[first], frames[last]])).permute(3, 0, 1, 2).float() / 255
        clip = F.interpolate(clip, size=(224, 298), mode="bilinear", align_corners=False)  # 48 x 64 -> 224 x 298
        clip = (clip - CLIP_MEAN[:, None]) / CLIP_STD[:, None]
        for c, left in enumerate((0, 37, 74)):
            torch.testing.assert_close(out[3 * k + c], clip[..., left: left + 224], atol=1e-5, rtol=1e-5)
    # an image path that is a video is read as a video
    assert media.load("image", tmp_path / "clip.mp4").shape == (15, 3, 2, 224, 224)


def test_an_image_is_resized_bicubic_and_centre_cropped(tmp_path):
    from torchvision.transforms import functional as TF

    pixels = np.random.default_rng(1).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    out = media.load("image", tmp_path / "wide.png")
    # shorter side 200 -> 224, long side int(224 * 300 / 200) = 336; crop offset round((336 - 224) / 2) = 56
    resized = TF.to_tensor(TF.resize(Image.fromarray(pixels), [224, 336], TF.InterpolationMode.BICUBIC))
    torch.testing.assert_close(out, (resized[:, :, 56:280] - CLIP_MEAN) / CLIP_STD)


def test_depth_and_thermal_maps(tmp_path):
    depth = np.arange(224 * 224, dtype=np.uint16).reshape(224, 224) % 5000
    Image.fromarray(depth).save(tmp_path / "depth.png")
    np.save(tmp_path / "depth.npy", depth.astype(np.float32))
    from_png = media.load("depth", tmp_path / "depth.png")
    assert from_png.shape == (1, 224, 224)
    torch.testing.assert_close(from_png, torch.from_numpy(depth.astype(np.float32))[None])  # as stored at 224
    torch.testing.assert_close(media.load("depth", tmp_path / "depth.npy"), from_png)
    gray = np.full((224, 224), 51, dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "thermal.png")
    torch.testing.assert_close(media.load("thermal", tmp_path / "thermal.png"), torch.full((1, 224, 224), 0.2))


def test_imu_arrays(tmp_path):
    data = np.random.default_rng(2).normal(size=(2000, 6)).astype(np.float32)
    np.save(tmp_path / "imu.npy", data)
    torch.testing.assert_close(media.load("imu", tmp_path / "imu.npy"), torch.from_numpy(data.T.copy()))
    np.save(tmp_path / "short.npy", data[:100])
    with pytest.raises(LitAdapterError, match=r"short.npy: IMU data must be \[6, 2000\], got \[100, 6\]"):
        media.load("imu", tmp_path / "short.npy")


def test_point_clouds_from_ply_xyz_npy_are_centred_and_scaled(tmp_path):
    from plyfile import PlyData, PlyElement

    points = np.random.default_rng(3).normal(size=(50, 3)).astype(np.float32) * 3 + 7
    vertex = np.array([tuple(p) for p in points], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(tmp_path / "cloud.ply"))
    np.savetxt(tmp_path / "cloud.xyz", points)
    np.save(tmp_path / "cloud.npy", points)
    centred = points - points.mean(axis=0)
    expected = torch.from_numpy(centred / np.linalg.norm(centred, axis=1).max())  # by hand
    for name in ("cloud.ply", "cloud.xyz", "cloud.npy"):
        out = media.load("point", tmp_path / name)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.norm(dim=1).max(), torch.tensor(1.0))
    torch.testing.assert_close(normalize_points(out), out)  # already in that form: unchanged
    np.save(tmp_path / "flat.npy", points[:, :2])
    with pytest.raises(LitAdapterError) as err:
        media.load("point", tmp_path / "flat.npy")
    assert "\n" not in str(err.value) and "flat.npy: a point cloud must be [N, 3]" in str(err.value)
