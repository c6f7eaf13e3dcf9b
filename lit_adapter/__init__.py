"""lit-adapter: LLaMA-Adapter V1 and V2 on a frozen LLaMA, with Lightning."""

from typing import Any

from lit_adapter.errors import LitAdapterError

__all__ = ["LLaMA", "LitAdapterError", "ModelConfig"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`lit_adapter.LLaMA` and `lit_adapter.ModelConfig` are imported on first use, so that `lit-adapter --help`
    and `--version` start without torch."""
    if name == "LLaMA":
        from lit_adapter.model import LLaMA

        return LLaMA
    if name == "ModelConfig":
        from lit_adapter.config import ModelConfig

        return ModelConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
