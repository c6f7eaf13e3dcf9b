"""Point clouds from .pcd files (ASCII, binary, binary_compressed) against the arrays written and Point-Bind's
normalisation computed by hand; an mp3 written with PyAV's LAME encoder against the same signal read from a WAV."""

from __future__ import annotations

import sys
import wave

import numpy as np
import pytest
import torch

from lit_adapter import media
from lit_adapter.errors import LitAdapterError
from lit_adapter.media.audio import read_audio

# ---- .pcd ----


def by_hand(points: np.ndarray) -> torch.Tensor:
    """Subtract the centroid, divide by the largest distance from it (in float64)."""
    centred = points.astype(np.float64) - points.astype(np.float64).mean(axis=0)
    return torch.from_numpy(centred / np.sqrt((centred**2).sum(axis=1)).max()).float()


@pytest.fixture(scope="module")
def points() -> np.ndarray:
    return (np.random.default_rng(4).normal(size=(40, 3)) * [3.0, 1.0, 0.5] + [10.0, -4.0, 2.0]).astype(np.float32)


def test_pcd_ascii_and_binary_compressed_written_by_pypcd4(tmp_path, points):
    from pypcd4 import Encoding, PointCloud

    # the cloud four times over: LZF finds the repeats (pypcd4 falls back to plain binary for incompressible data)
    cloud = np.tile(points, (4, 1))
    for encoding in (Encoding.ASCII, Encoding.BINARY_COMPRESSED):
        path = tmp_path / f"cloud_{encoding.value}.pcd"
        PointCloud.from_xyz_points(cloud).save(path, encoding=encoding)
        assert f"\nDATA {encoding.value}\n" in path.read_bytes()[:200].decode(errors="replace")
        out = media.load("point", path)
        assert out.dtype == torch.float32 and out.shape == (160, 3)
        torch.testing.assert_close(out, by_hand(cloud), atol=1e-6, rtol=1e-5)


def test_pcd_binary_written_by_hand_takes_x_y_z_by_name(tmp_path, points):
    """PCD 0.7 binary: the header, then the points as packed little-endian records in FIELDS order; here a 1-byte
    intensity first and the coordinates as 8-byte floats, so reading columns by position would fail."""
    record = np.dtype([("intensity", "u1"), ("x", "<f8"), ("y", "<f8"), ("z", "<f8")])
    data = np.zeros(len(points), record)
    data["intensity"] = np.arange(len(points)) * 5
    data["x"], data["y"], data["z"] = points.astype(np.float64).T
    header = ("# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\nFIELDS intensity x y z\nSIZE 1 8 8 8\n"
              f"TYPE U F F F\nCOUNT 1 1 1 1\nWIDTH {len(points)}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\n"
              f"POINTS {len(points)}\nDATA binary\n")
    (tmp_path / "cloud.pcd").write_bytes(header.encode() + data.tobytes())
    torch.testing.assert_close(media.load("point", tmp_path / "cloud.pcd"), by_hand(points), atol=1e-6, rtol=1e-5)

    no_z = header.replace("FIELDS intensity x y z", "FIELDS intensity x y w")
    (tmp_path / "flat.pcd").write_bytes(no_z.encode() + data.tobytes())
    with pytest.raises(LitAdapterError) as err:
        media.load("point", tmp_path / "flat.pcd")
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{tmp_path / 'flat.pcd'}: the PCD file has no "
                                                                    "field 'z'")
    truncated = {100: "cut.pcd: the PCD header declares 40 points, the file holds 4",  # 4 whole records
                 101: "cut.pcd: cannot read the point cloud"}  # then 1 byte of the fifth
    for cut, problem in truncated.items():
        (tmp_path / "cut.pcd").write_bytes(header.encode() + data.tobytes()[:cut])
        with pytest.raises(LitAdapterError) as err:
            media.load("point", tmp_path / "cut.pcd")
        assert "\n" not in str(err.value) and problem in str(err.value)


def test_pcd_without_pypcd4_says_how_to_get_it(tmp_path, points, monkeypatch):
    from pypcd4 import PointCloud

    PointCloud.from_xyz_points(points).save(tmp_path / "cloud.pcd")
    monkeypatch.setitem(sys.modules, "pypcd4", None)  # the import fails as if it were not installed
    with pytest.raises(LitAdapterError) as err:
        media.load("point", tmp_path / "cloud.pcd")
    assert "\n" not in str(err.value) and "cloud.pcd: reading .pcd needs pypcd4 (pip install pypcd4" in str(err.value)


# ---- mp3 ----

RATE, SECONDS = 44100, 3.0
PADDING = 4.268 / 9.138  # a zero fbank cell after ImageBind's normalisation


def melody() -> np.ndarray:
    """A new note every 0.25 s (nine harmonics each) plus a little noise, as int16: features that change in time,
    so a decode shifted or cut in time shows."""
    t = np.arange(int(SECONDS * RATE)) / RATE
    notes = np.array([220, 330, 262, 392, 294, 440, 247, 349, 523, 196, 370, 311])[(t * 4).astype(int)]
    phase = 2 * np.pi * np.cumsum(notes) / RATE
    x = sum(0.5 / k * np.sin(k * phase) for k in range(1, 10)) + 0.02 * np.random.default_rng(5).normal(size=t.size)
    return np.round(x / np.abs(x).max() * 0.8 * 32767).astype(np.int16)


def test_an_mp3_gives_the_features_of_the_same_signal_as_wav(tmp_path):
    import av

    samples = melody()
    with wave.open(str(tmp_path / "melody.wav"), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(samples.tobytes())
    with av.open(str(tmp_path / "melody.mp3"), "w") as out:
        stream = out.add_stream("libmp3lame", rate=RATE, layout="mono")
        stream.bit_rate = 128_000
        frame = av.AudioFrame.from_ndarray(samples[None], format="s16", layout="mono")
        frame.sample_rate = RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    with av.open(str(tmp_path / "melody.mp3")) as container:
        assert container.streams.audio[0].codec_context.name in ("mp3", "mp3float")  # really an mp3
    waveform, rate = read_audio(tmp_path / "melody.mp3")
    # the encoder's delay and padding are recorded in the LAME header and trimmed by the decoder: exactly 3 s
    assert rate == RATE and waveform.shape == (1, len(samples))
    mp3, wav = media.load("audio", tmp_path / "melody.mp3"), media.load("audio", tmp_path / "melody.wav")
    assert mp3.shape == wav.shape == (3, 1, 128, 204)
    # real content, not the padding a too short or silent decode would leave: 198 frames of 2 s far from the padding
    # value, changing in time; then the 6 padded frames
    assert (wav[..., :198] - PADDING).abs().mean() > 0.2 and wav[..., :198].std(dim=-1).mean() > 0.1
    torch.testing.assert_close(mp3[..., 198:], torch.full_like(mp3[..., 198:], PADDING))
    # MP3 at 128 kbit/s keeps the band (LAME's low-pass is far above the 8 kHz of 16 kHz audio) with quantisation
    # noise well below the signal: the log-mel cells differ by ~0.2 (in ImageBind's units, ~0.02; the largest
    # differences, ~0.6, are pre-echo at note onsets). A decode off by LAME's 1105-sample delay differs by ~0.1 on
    # average, one at half the amplitude (a wrong PCM scale) by 2 ln 2 / 9.138 = 0.15 everywhere.
    difference = (mp3 - wav)[..., :198].abs()
    assert 0 < difference.mean() < 0.04
    assert difference.quantile(0.95) < 0.1
