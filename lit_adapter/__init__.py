"""lit-adapter: LLaMA-Adapter V1 and V2 on a frozen LLaMA, with Lightning."""

from lit_adapter.config import ModelConfig
from lit_adapter.errors import LitAdapterError
from lit_adapter.model import LLaMA

__all__ = ["LLaMA", "LitAdapterError", "ModelConfig"]
__version__ = "0.1.0"
