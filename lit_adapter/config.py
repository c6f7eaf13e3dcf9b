"""Model configuration: the architecture of a LLaMA model, plus the named configs we know."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from lit_adapter.errors import LitAdapterError


@dataclass
class DictConfig:
    """A dataclass config that reads and writes plain mappings (YAML files), refusing unknown keys by name."""

    config_name: ClassVar[str] = "config"  # how errors name a mapping of this kind

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Optional[str] = None) -> Any:
        check_known_keys(cls, data, source or cls.config_name)
        return cls(**data)


@dataclass
class ModelConfig(DictConfig):
    """Architecture hyper-parameters of a LLaMA model (Meta's `params.json` names where they exist)."""

    config_name: ClassVar[str] = "model config"

    name: str = "custom"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    hidden_dim: Optional[int] = None  # explicit FFN size; derived from dim when None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = llama_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if self.dim % self.n_heads:
            raise LitAdapterError(f"model config {self.name!r}: dim {self.dim} is not a multiple of n_heads")
        if self.n_heads % self.n_kv_heads:
            raise LitAdapterError(
                f"model config {self.name!r}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in NAMED_CONFIGS:
            raise LitAdapterError(f"unknown model name {name!r}; known names: {', '.join(sorted(NAMED_CONFIGS))}")
        return cls(**{**NAMED_CONFIGS[name], "name": name, **overrides})

    def architecture_hash(self) -> str:
        """A short hash of everything that decides weight shapes and numerics (not the name).

        multiple_of and ffn_dim_multiplier are left out: they only derive hidden_dim, which is always resolved, so a
        model converted from a format that states hidden_dim directly (Hugging Face) hashes like its Meta original.
        """
        derived_only = ("name", "max_seq_len", "multiple_of", "ffn_dim_multiplier")
        arch = {k: v for k, v in self.to_dict().items() if k not in derived_only}
        return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


def check_known_keys(cls: type, data: dict[str, Any], source: str) -> None:
    """Fail with one line naming the unknown keys of a config mapping meant for the dataclass `cls`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LitAdapterError(f"{source}: unknown keys {unknown}; expected a subset of {sorted(known)}")


def llama_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float] = None) -> int:
    """Meta's FFN size: 2/3 of 4*dim, optionally scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


_LLAMA1 = dict(vocab_size=32000, norm_eps=1e-6, max_seq_len=2048)
_LLAMA2 = dict(vocab_size=32000, norm_eps=1e-5, max_seq_len=4096)

NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-7b": dict(_LLAMA1, dim=4096, n_layers=32, n_heads=32),
    "llama-13b": dict(_LLAMA1, dim=5120, n_layers=40, n_heads=40),
    "llama-33b": dict(_LLAMA1, dim=6656, n_layers=60, n_heads=52),
    "llama-65b": dict(_LLAMA1, dim=8192, n_layers=80, n_heads=64),
    "llama2-7b": dict(_LLAMA2, dim=4096, n_layers=32, n_heads=32),
    "llama2-13b": dict(_LLAMA2, dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": dict(
        _LLAMA2, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096
    ),
    "stories260K": dict(
        vocab_size=512, dim=64, n_layers=5, n_heads=8, n_kv_heads=4, hidden_dim=172, norm_eps=1e-5, max_seq_len=512,
        tie_embeddings=True,
    ),
    # tiny configs for tests and smoke runs
    "tiny": dict(vocab_size=512, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=128),
    "tiny-gqa": dict(vocab_size=512, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=128),
}
