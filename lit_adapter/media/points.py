"""Point clouds as the point trunk takes them: [N, 3] float32, centred and scaled to unit radius.

ImageBind-LLM feeds clouds as stored; its examples are already in the form Point-Bind was trained on (the centroid
subtracted, divided by the largest point norm), which `normalize_points` makes of any cloud (and leaves such a
cloud unchanged). Files: .ply (plyfile), .pcd (pypcd4: ASCII, binary and binary_compressed; the fields named x,
y, z), .xyz / .txt / .pts (whitespace columns, x y z first), .npy and .pt ([N, >=3] arrays).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lit_adapter.errors import LitAdapterError, first_line

TEXT_SUFFIXES = (".xyz", ".txt", ".pts")
SUFFIXES = (".ply", ".npy", ".pt", ".pcd", *TEXT_SUFFIXES)


def normalize_points(xyz: torch.Tensor) -> torch.Tensor:
    """Subtract the centroid, divide by the largest distance from it (Point-Bind's training normalisation)."""
    centred = xyz - xyz.mean(dim=0)
    return centred / centred.norm(dim=1).max().clamp_min(torch.finfo(xyz.dtype).tiny)


def read_points(path: Path) -> np.ndarray:
    """The file's points as an [N, 3] array."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise LitAdapterError(f"{path}: unknown point cloud format {suffix!r}; use one of {list(SUFFIXES)}")
    try:
        array = _read(path, suffix)
    except LitAdapterError:
        raise
    except Exception as err:  # each reader raises its own types for unreadable files
        raise LitAdapterError(f"{path}: cannot read the point cloud ({first_line(err)})") from None
    if array.ndim != 2 or array.shape[1] < 3 or array.shape[0] == 0:
        raise LitAdapterError(f"{path}: a point cloud must be [N, 3] (extra columns ignored), got shape "
                              f"{list(array.shape)}")
    return array[:, :3]


def _read(path: Path, suffix: str) -> np.ndarray:
    if suffix == ".ply":
        from plyfile import PlyData

        vertex = PlyData.read(str(path))["vertex"]
        return np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1)
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".pt":
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, torch.Tensor):
            raise LitAdapterError(f"{path}: expected a tensor [N, 3], got {type(data).__name__}")
        return data.numpy()
    if suffix == ".pcd":
        return _read_pcd(path)
    return np.loadtxt(path, ndmin=2)


def _read_pcd(path: Path) -> np.ndarray:
    """The x, y, z fields of a PCD file (ASCII, binary or binary_compressed), by name: other fields (intensity,
    rgb, normals) may come in any order."""
    try:
        from pypcd4 import PointCloud
    except ImportError:
        raise LitAdapterError(f"{path}: reading .pcd needs pypcd4 (pip install pypcd4, or the extra "
                              "lit-adapter[imagebind]), or convert it to .ply/.xyz/.npy") from None
    cloud = PointCloud.from_path(path)
    missing = [axis for axis in "xyz" if axis not in cloud.fields]
    if missing:
        raise LitAdapterError(f"{path}: the PCD file has no field {missing[0]!r} (fields: {list(cloud.fields)}); "
                              "a point cloud needs x, y and z")
    xyz = cloud.numpy(("x", "y", "z"))
    if len(xyz) != cloud.points:  # binary data cut at a record boundary reads without complaint
        raise LitAdapterError(f"{path}: the PCD header declares {cloud.points} points, the file holds {len(xyz)}: "
                              "the file is truncated")
    return xyz


def load_points(path: Path) -> torch.Tensor:
    xyz = torch.from_numpy(np.ascontiguousarray(read_points(path), dtype=np.float32))
    if not torch.isfinite(xyz).all():
        raise LitAdapterError(f"{path}: the point cloud holds NaN or infinite coordinates")
    return normalize_points(xyz)
