"""Data: prompt styles, record validation, instruction / caption / ScienceQA data modules, built-in demo data.

Names are imported on first use, so that `lit_adapter.data.prompts` stays light for generation (no Lightning).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BUILTIN_DEMO": "demo",
    "CaptionDataModule": "caption",
    "IGNORE_INDEX": "encoding",
    "InstructionDataModule": "instruction",
    "PAD_ID": "encoding",
    "PROMPT_STYLES": "prompts",
    "PromptStyle": "prompts",
    "ScienceQADataModule": "scienceqa",
    "ScienceQAProblem": "scienceqa",
    "build_prompt": "scienceqa",
    "collate": "encoding",
    "get_prompt_style": "prompts",
    "load_problems": "scienceqa",
    "target_text": "scienceqa",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
