"""The checkpoint a run resumes from (`--ckpt_path`), checked before Lightning reads it.

Lightning would fail on a missing, truncated or unsafe file, or one written for another adapter config, with a
traceback; here each is one line naming the file and what to do. `--ckpt_path last` with no checkpoint yet keeps
Lightning's behaviour (the run starts from scratch, so a requeued job can always pass it) and says so in one line.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from lit_adapter.errors import LitAdapterError, torch_load_problem

# ckpt_path values Lightning resolves itself
SPECIAL_PATHS = ("last", "best", "hpc")
AFRESH = "pass another checkpoint, or leave out --ckpt_path to start afresh"


def check_resume_file(ckpt_path: Optional[str]) -> Optional[dict[str, Any]]:
    """The checkpoint at `ckpt_path` read safely (None for no path or a special value), or one clear error."""
    if ckpt_path is None or str(ckpt_path) in SPECIAL_PATHS:
        return None
    path = Path(ckpt_path)
    if not path.is_file():
        raise LitAdapterError(f"--ckpt_path {ckpt_path}: checkpoint file not found; pass a .ckpt written by this "
                              "run (in its checkpoints folder), or --ckpt_path last to resume the newest")
    return read_checkpoint(path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, loaded as tensors only (a pickle that asks for anything else is refused)."""
    try:
        with warnings.catch_warnings():  # torch's warnings about odd pickles: the error below says what matters
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign file, refused pickle: none of them can be resumed
        raise LitAdapterError(f"{path}: {torch_load_problem(err)}; {AFRESH}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise LitAdapterError(f"{path}: not a checkpoint of `lit-adapter fit` (no state_dict); {AFRESH}")
    return checkpoint


def check_adapter_matches(checkpoint: dict[str, Any], path: str, model: Any) -> None:
    """The checkpoint's tensors fit only the adapter config they were trained with: name the first setting of
    `model.adapter` (this run's model arguments, a mapping) that differs from the checkpoint's."""
    saved = checkpoint.get("adapter_config")
    adapter = model.get("adapter") if hasattr(model, "get") else None
    if not isinstance(saved, dict) or adapter is None:
        return
    adapter = adapter.to_dict() if hasattr(adapter, "to_dict") else dict(adapter)
    for key in sorted(saved):
        ours, theirs = adapter.get(key), saved[key]
        if isinstance(theirs, dict) or isinstance(ours, dict):  # the visual encoder: compared by presence only
            ours, theirs = ours is not None, theirs is not None
        if _plain(ours) != _plain(theirs):
            raise LitAdapterError(
                f"{path}: written with model.adapter.{key}: {saved[key]!r}, but this run has {adapter.get(key)!r}; "
                f"resume with the checkpoint's adapter settings, or {AFRESH}"
            )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def resolve_last(trainer: Any, subcommand: str) -> Optional[str]:
    """The checkpoint `--ckpt_path last` resumes (Lightning's own choice), or None after saying in one line that
    there is none yet and the run starts from scratch."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from lightning.pytorch.trainer.states import TrainerFn

    with warnings.catch_warnings():  # its warning would say the same in several lines
        warnings.simplefilter("ignore")
        path = trainer._checkpoint_connector._parse_ckpt_path(
            TrainerFn(subcommand), "last", model_provided=True, model_connected=True
        )
    if path is None:
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        outcome = "this run starts from scratch" if subcommand == "fit" else "the untrained adapter is used"
        if getattr(rank_zero_only, "rank", 0) == 0:
            print(f"--ckpt_path last: no checkpoint in {folder} yet, so {outcome}", file=sys.stderr, flush=True)
    return path
