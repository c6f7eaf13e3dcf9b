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
    """Architecture hyper-parameters of a LLaMA-style decoder (Meta's `params.json` names where they exist).

    The fields after `tie_embeddings` are the variants of the other families (Llama 3, Mistral, Qwen2/3, Falcon);
    their defaults are LLaMA's, so a LLaMA config (and its `model_config.yaml`) reads and hashes as it always did:
    - head_dim: per-head size; dim // n_heads unless given (Qwen3's small models have wider heads).
    - norm: "rmsnorm" (LLaMA) or "layernorm" (Falcon: mean and variance, weight and bias).
    - mlp: "swiglu" w2(silu(w1 x) * w3 x) (LLaMA) or "gelu" w2(gelu(w1 x)) (Falcon, no w3).
    - parallel_residual: x + attention(norm(x)) + mlp(norm'(x)) instead of two residual steps (Falcon).
    - shared_norm: with a parallel residual, attention and MLP read one norm, `attention_norm` (Falcon-7B).
    - linear_bias: the block's linears that carry a bias (Qwen2: wq, wk, wv; Falcon with `bias: true`: all).
    - qk_norm: an RMSNorm over each head of q and k before RoPE (Qwen3).
    - rope_scaling: None, or Llama 3.1's wavelength-band rescaling of the RoPE frequencies
      {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}.
    """

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
    head_dim: Optional[int] = None
    norm: str = "rmsnorm"
    mlp: str = "swiglu"
    parallel_residual: bool = False
    shared_norm: bool = False
    linear_bias: list[str] = dataclasses.field(default_factory=list)
    qk_norm: bool = False
    rope_scaling: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = llama_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise LitAdapterError(f"model config {self.name!r}: dim {self.dim} is not a multiple of n_heads")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise LitAdapterError(
                f"model config {self.name!r}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        self.linear_bias = list(self.linear_bias)  # own copies: the named configs' values are shared
        self.rope_scaling = dict(self.rope_scaling) if isinstance(self.rope_scaling, dict) else self.rope_scaling
        check_variants(self)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in NAMED_CONFIGS:
            raise LitAdapterError(f"unknown model name {name!r}; known names: {', '.join(sorted(NAMED_CONFIGS))}")
        return cls(**{**NAMED_CONFIGS[name], "name": name, **overrides})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["head_dim"] == self.dim // self.n_heads:
            data["head_dim"] = None  # derived (as in every LLaMA config): follows dim and n_heads if they are edited
        return data

    def linears(self) -> tuple[str, ...]:
        """The linear modules of a block: LINEAR_NAMES, without w3 for the GELU MLP."""
        return tuple(n for n in LINEAR_NAMES if n != "w3" or self.mlp == "swiglu")

    def architecture_hash(self) -> str:
        """A short hash of everything that decides weight shapes and numerics (not the name).

        multiple_of and ffn_dim_multiplier are left out: they only derive hidden_dim, which is always resolved, so a
        model converted from a format that states hidden_dim directly (Hugging Face) hashes like its Meta original.
        The family fields count only where they differ from LLaMA's, so LLaMA configs hash as before they existed.
        """
        derived_only = ("name", "max_seq_len", "multiple_of", "ffn_dim_multiplier")
        llama = {**LLAMA_VARIANTS, "head_dim": self.dim // self.n_heads}
        resolved = dataclasses.asdict(self)
        arch = {k: v for k, v in resolved.items() if k not in derived_only and not (k in llama and llama[k] == v)}
        return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # attention: wq..wo; MLP: w1 in, w2 out, w3 (SwiGLU) up
NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
ROPE_SCALING_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len")
# the family fields at their LLaMA values (head_dim aside: dim // n_heads)
LLAMA_VARIANTS: dict[str, Any] = dict(norm="rmsnorm", mlp="swiglu", parallel_residual=False, shared_norm=False,
                                      linear_bias=[], qk_norm=False, rope_scaling=None)


def check_variants(config: ModelConfig) -> None:
    """Fail with one line naming the family field that the model cannot build."""
    def check(condition: bool, message: str) -> None:
        if not condition:
            raise LitAdapterError(f"model config {config.name!r}: {message}")

    check(config.norm in NORMS, f"norm must be one of {list(NORMS)}, got {config.norm!r}")
    check(config.mlp in MLPS, f"mlp must be one of {list(MLPS)}, got {config.mlp!r}")
    unknown = [n for n in config.linear_bias if n not in config.linears()]
    check(not unknown, f"linear_bias: {unknown} are not linears of this block; choose among {list(config.linears())}")
    check(config.parallel_residual or not config.shared_norm, "shared_norm needs parallel_residual")
    check(config.head_dim > 0 and config.head_dim % 2 == 0, f"head_dim {config.head_dim} is not a positive even "
                                                            "number (RoPE rotates pairs)")
    scaling = config.rope_scaling
    if scaling is not None:
        check(isinstance(scaling, dict) and sorted(scaling) == sorted(ROPE_SCALING_KEYS),
              f"rope_scaling must be a mapping with exactly the keys {list(ROPE_SCALING_KEYS)}")
        check(scaling["rope_type"] == "llama3", f"rope_scaling: rope_type {scaling['rope_type']!r} is not supported; "
                                                "only 'llama3'")
        check(scaling["high_freq_factor"] > scaling["low_freq_factor"] > 0 and scaling["factor"] > 0,
              "rope_scaling: needs factor > 0 and high_freq_factor > low_freq_factor > 0")


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


def _llama3(factor: float, original_max_seq_len: int = 8192) -> dict[str, Any]:
    return dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_seq_len=original_max_seq_len)


_LLAMA3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, n_kv_heads=8, max_seq_len=131072)
_QWEN = dict(norm_eps=1e-6, rope_theta=1000000.0)
_FALCON = dict(vocab_size=65024, norm="layernorm", mlp="gelu", parallel_residual=True, max_seq_len=2048,
               tie_embeddings=True)

# the published config.json of each model, in our fields (tests/core/test_named_configs.py counts the parameters
# of each against transformers' own model built from the same Hugging Face config)
NAMED_CONFIGS.update({
    "Llama-3-8B": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, hidden_dim=14336, max_seq_len=8192),
    "Llama-3.1-8B": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, hidden_dim=14336, rope_scaling=_llama3(8.0)),
    "Llama-3.1-70B": dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, hidden_dim=28672, rope_scaling=_llama3(8.0)),
    "Llama-3.2-1B": dict(_LLAMA3, dim=2048, n_layers=16, n_heads=32, hidden_dim=8192, tie_embeddings=True,
                         rope_scaling=_llama3(32.0)),
    "Llama-3.2-3B": dict(_LLAMA3, dim=3072, n_layers=28, n_heads=24, hidden_dim=8192, tie_embeddings=True,
                         rope_scaling=_llama3(32.0)),
    # v0.1's sliding window (4096) equals full causal attention up to the window: its context is capped there
    "Mistral-7B-v0.1": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                            norm_eps=1e-5, max_seq_len=4096),
    "Mistral-7B": dict(vocab_size=32768, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                       norm_eps=1e-5, rope_theta=1000000.0, max_seq_len=32768),  # v0.3
    "Qwen2.5-0.5B": dict(_QWEN, vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864,
                         linear_bias=["wq", "wk", "wv"], tie_embeddings=True, max_seq_len=32768),
    "Qwen2.5-7B": dict(_QWEN, vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, hidden_dim=18944,
                       linear_bias=["wq", "wk", "wv"], max_seq_len=131072),
    "Qwen3-0.6B": dict(_QWEN, vocab_size=151936, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
                       hidden_dim=3072, qk_norm=True, tie_embeddings=True, max_seq_len=40960),
    "Qwen3-8B": dict(_QWEN, vocab_size=151936, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128,
                     hidden_dim=12288, qk_norm=True, max_seq_len=40960),
    "Falcon-7B": dict(_FALCON, dim=4544, n_layers=32, n_heads=71, n_kv_heads=1, hidden_dim=4 * 4544,
                      shared_norm=True),
    "Falcon-40B": dict(_FALCON, dim=8192, n_layers=60, n_heads=128, n_kv_heads=8, hidden_dim=4 * 8192),
    "Falcon-180B": dict(_FALCON, dim=14848, n_layers=80, n_heads=232, n_kv_heads=8, hidden_dim=4 * 14848),
})


# ---- the fields of a model_config.yaml, checked before the dataclass sees them ----

# fields that count or scale something (a zero would divide by zero or build an empty model)
_POSITIVE = {"vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "hidden_dim", "head_dim",
             "max_seq_len", "norm_eps", "rope_theta", "ffn_dim_multiplier"}


def check_model_config_fields(data: dict[str, Any], source: str) -> None:
    """Fail with one line naming `source` (the file) and the key whose value has the wrong type or is not positive,
    judged by ModelConfig's own annotations (so every field is checked, including ones added later)."""
    import types
    import typing

    check_known_keys(ModelConfig, data, source)
    hints = typing.get_type_hints(ModelConfig)
    for key, value in data.items():
        expected = hints[key]
        union = typing.get_origin(expected) in (typing.Union, types.UnionType)
        members = typing.get_args(expected) if union else (expected,)
        optional = type(None) in members
        kinds = tuple(t for t in members if t is not type(None))
        if value is None and optional:
            continue
        if not _has_type(value, kinds):
            names = " or ".join(getattr(t, "__name__", str(t)) for t in kinds) + (" (or null)" if optional else "")
            raise LitAdapterError(f"{source}: key {key!r} is {value!r}, expected {names}")
        if key in _POSITIVE and not value > 0:
            raise LitAdapterError(f"{source}: key {key!r} is {value!r}, expected a positive number")


def _has_type(value: Any, kinds: tuple) -> bool:
    """Whether `value` (read from YAML) fits one of the annotation's types (Literal values, generics by origin)."""
    import typing

    for kind in kinds:
        origin = typing.get_origin(kind)
        if origin is typing.Literal:
            if value in typing.get_args(kind):
                return True
        elif isinstance(value, bool):  # YAML's true/false are ints to Python, never a count
            if kind is bool:
                return True
        elif kind is float and isinstance(value, (int, float)):
            return True
        elif isinstance(origin or kind, type) and isinstance(value, origin or kind):
            return True
    return False
