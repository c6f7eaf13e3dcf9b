"""IMU recordings as ImageBind takes them: [6, 2000] (accelerometer and gyroscope x, y, z over 2000 samples).

The official code has no IMU loader; the values are taken as stored. Files: .npy or .pt holding [6, 2000]
(or [2000, 6], transposed here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lit_adapter.errors import LitAdapterError, first_line

CHANNELS, LENGTH = 6, 2000


def load_imu(path: Path) -> torch.Tensor:
    try:
        if path.suffix.lower() == ".pt":
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            data = torch.from_numpy(np.load(path, allow_pickle=False))
    except Exception as err:  # numpy and torch raise many types for unreadable files
        raise LitAdapterError(f"{path}: cannot read IMU data ({first_line(err)}); pass a .npy or .pt array") from None
    if not isinstance(data, torch.Tensor) or data.ndim != 2 or set(data.shape) != {CHANNELS, LENGTH}:
        shape = list(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise LitAdapterError(f"{path}: IMU data must be [{CHANNELS}, {LENGTH}], got {shape}")
    data = data.float()
    return data if data.shape[0] == CHANNELS else data.T.contiguous()
