"""LLaMA-Adapter V1 and V2 on a frozen LLaMA: prompts with zero-init gates, bias/scale, LoRA, visual prompts.

The rooms (as PEFT's tuner packages): `config.py` (AdapterConfig), `prompt.py` (the gated adaption prompts),
`linear.py` (bias/scale and LoRA, folding), `visual.py` + `clip.py` (the visual adapter and its frozen CLIP tower),
`model.py` (AdapterModel; attach, build, load), `formats/` (our files and the official releases), `merge.py`
(folding into the base weights), `groups.py` (the visual/language parameter groups of joint training).
"""

from __future__ import annotations

from lit_adapter.adapters.config import AdapterConfig
from lit_adapter.adapters.formats import read_adapter, save_adapter
from lit_adapter.adapters.model import (
    AdapterModel,
    attach_adapters,
    build_adapter_model,
    load_adapter,
    load_adapter_model,
)
from lit_adapter.adapters.visual import VisualConfig

__all__ = [
    "AdapterConfig",
    "AdapterModel",
    "VisualConfig",
    "attach_adapters",
    "build_adapter_model",
    "load_adapter",
    "load_adapter_model",
    "read_adapter",
    "save_adapter",
]
