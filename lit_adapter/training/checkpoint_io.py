"""Checkpoint files that are either complete or absent: written to a temporary file beside the target, then renamed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from lit_adapter.files import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into `.name.XXXX.tmp`, fsync, then os.replace onto the target.

    Lightning's own writer serialises to memory and writes through an fsspec transaction whose temporary file may sit
    on another filesystem (then the final move is a copy, and a kill mid-copy leaves a truncated checkpoint).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_path(Path(path)) as tmp:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
