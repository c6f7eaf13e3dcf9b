"""Data: the typed batch, the settings taken from the model, record validation, instruction / caption / ScienceQA
data modules, joint training data, built-in demo data.

Names are imported on first use, so that importing one data module does not import them all (nor Lightning).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BUILTIN_DEMO": "demo",
    "CAPTION": "batch",
    "CaptionDataModule": "caption",
    "DataSettings": "base",
    "IGNORE_INDEX": "batch",
    "INSTRUCTION": "batch",
    "InstructionDataModule": "instruction",
    "JointDataModule": "joint",
    "PAD_ID": "encoding",
    "ScienceQADataModule": "scienceqa",
    "ScienceQAProblem": "scienceqa",
    "TrainingBatch": "batch",
    "build_prompt": "scienceqa",
    "collate": "encoding",
    "load_problems": "scienceqa",
    "target_text": "scienceqa",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
