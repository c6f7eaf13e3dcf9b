"""Checkpoint files that are either complete or absent, and a checkpoint folder that holds only what the run's
retention keeps, however often the run was killed.

- `AtomicCheckpointIO` writes each checkpoint to a temporary file beside the target, then renames it.
- `CheckpointHygiene` (a callback; `lit-adapter fit` adds it) cleans up after kills when a run starts: the
  temporaries of writes that a kill interrupted (`.last.ckpt.XXXXXXXX.tmp`, `.step-0000004.ckpt.XXXXXXXX.tmp`), and,
  on a resume from the run's last checkpoint, the run's own checkpoints of later steps. Such orphans arise when a run
  is killed after writing step N's checkpoint but before `last.ckpt` (which is written after it) is complete: the
  resumed run (from step N - 2) finds step N's file taken, writes `step-N-v1.ckpt` beside it and keeps that one's
  retention, and nothing ever removes the first (one orphan per kill). Removed first, the file is simply written
  again, and `save_top_k` holds. Which files are the run's own is known from a run id every checkpoint carries (kept
  across resumes): the files of any other run in the same folder, an earlier one included, are never touched.

A checkpoint folder belongs to one run at a time: the temporaries removed at the start are those of any killed
writer.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Callback

from lit_adapter.files import atomic_path, remove_stale_temporaries

RUN_ID = "lit_adapter_run_id"  # the top-level checkpoint key naming the run (a fresh fit's; a resume keeps it)
CHECKPOINT_SUFFIX = ".ckpt"


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


def checkpoint_header(path: Path) -> Optional[tuple[Optional[str], int]]:
    """(run id, global step) of a checkpoint file, or None where it cannot be read as a plain tensor checkpoint."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # truncated, hostile or foreign: not ours to judge here
        return None
    if not isinstance(checkpoint, dict):
        return None
    return checkpoint.get(RUN_ID), int(checkpoint.get("global_step", -1))


class CheckpointHygiene(Callback):
    """Removes kill debris from the checkpoint folders at the start of training, and on a resume the checkpoints of
    this run that its retention no longer keeps (see the module docstring). Global rank 0 does the removing."""

    def __init__(self) -> None:
        self.run_id = uuid.uuid4().hex
        self.resumed_step: Optional[int] = None
        self.removed: list[Path] = []

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[RUN_ID] = self.run_id

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get(RUN_ID):
            self.run_id = checkpoint[RUN_ID]
            self.resumed_step = int(checkpoint.get("global_step", 0))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.run_id = trainer.strategy.broadcast(self.run_id)  # rank 0's, which is the one its checkpoints carry
        if not trainer.is_global_zero:
            return
        from lightning.pytorch.callbacks import ModelCheckpoint

        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath and os.path.isdir(callback.dirpath):
                folder = Path(callback.dirpath)
                self.removed += remove_stale_temporaries(folder, lambda name: name.endswith(CHECKPOINT_SUFFIX))
                if self.resumed_step is not None and trainer.ckpt_path:
                    self.removed += self.remove_orphans(folder, callback, trainer.ckpt_path)

    def remove_orphans(self, folder: Path, callback: Any, resumed_from: _PATH) -> list[Path]:
        """On a resume from this run's own last checkpoint (`--ckpt_path last`), this run's checkpoints in `folder` of
        later steps: written by an attempt killed before it wrote `last`, they would stay beside the new files of the
        same steps forever. (A resume from an older checkpoint rewinds on purpose and removes nothing.)"""
        if os.path.realpath(resumed_from) != os.path.realpath(callback.last_model_path or os.devnull):
            return []
        keep = {callback.best_model_path, callback.last_model_path, str(resumed_from), *callback.best_k_models}
        keep = {os.path.realpath(p) for p in keep if p}
        removed = []
        for path in sorted(folder.glob(f"*{CHECKPOINT_SUFFIX}")):
            if os.path.realpath(path) in keep or path.is_symlink() or not path.is_file():
                continue
            header = checkpoint_header(path)
            if header is not None and header[0] == self.run_id and header[1] > self.resumed_step:
                path.unlink()
                removed.append(path)
        return removed
