"""The Hugging Face architectures that convert, as data: how each config.json reads into a ModelConfig, and where
each of our weights sits in its state dict.

- Llama-style (`LlamaForCausalLM` incl. Llama 3.x, `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`):
  `model.layers.{i}.self_attn.q_proj`, ..., one HF tensor per weight of ours.
- `FalconForCausalLM` (rotary only): `transformer.h.{i}.self_attention.query_key_value` holds wq, wk and wv fused,
  grouped per KV head (the group's query heads, then its key, then its value); the 7B's multi-query layout (all
  queries, then the one key, then the one value) is the same order with one group.

All of them store q/k rows for rotate-half RoPE; `hf.py` turns them into our interleaved order (`unpermute`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from lit_adapter.config import ModelConfig
from lit_adapter.errors import LitAdapterError

HFConfig = dict[str, Any]

LLAMA_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
LLAMA_LAYER = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
FALCON_TOP = {"tok_embeddings.weight": "transformer.word_embeddings.weight", "norm.weight": "transformer.ln_f.weight",
              "norm.bias": "transformer.ln_f.bias", "output.weight": "lm_head.weight"}
FALCON_QKV = "self_attention.query_key_value"
FALCON_LAYER = {
    "attention.wq": FALCON_QKV, "attention.wk": FALCON_QKV, "attention.wv": FALCON_QKV,
    "attention.wo": "self_attention.dense", "feed_forward.w1": "mlp.dense_h_to_4h",
    "feed_forward.w2": "mlp.dense_4h_to_h",
}
# Falcon's norms by layout: one shared (7B), two parallel (40B/180B), two sequential (parallel_attn false)
FALCON_NORMS = {
    "shared": {"attention_norm": "input_layernorm"},
    "parallel": {"attention_norm": "ln_attn", "ffn_norm": "ln_mlp"},
    "sequential": {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
}
ATTENTION_BIAS = ["wq", "wk", "wv", "wo"]


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture: its names, its config reader, and where our weights sit in its state dict."""

    architecture: str
    model_types: tuple[str, ...]
    read_config: Callable[[HFConfig, Path], dict[str, Any]]  # config.json -> ModelConfig fields
    layers: str  # the prefix of layer i's weights, before ".{i}."
    top: dict[str, str]  # our key -> HF key, outside the layers
    layer: Callable[[ModelConfig], dict[str, str]]  # our module in a block -> HF module

    def hf_key(self, key: str, config: ModelConfig) -> str:
        """The HF key that holds our weight `key` (wq, wk and wv of Falcon all map to its fused query_key_value)."""
        if key in self.top:
            return self.top[key]
        _, index, *module, param = key.split(".")
        return f"{self.layers}.{index}.{self.layer(config)['.'.join(module)]}.{param}"


def require_int(cfg: HFConfig, path: Path, *names: str) -> int:
    """The first of `names` present in config.json, as an integer (Falcon's older files use other names)."""
    for name in names:
        if name in cfg:
            if isinstance(cfg[name], int) and not isinstance(cfg[name], bool):
                return cfg[name]
            raise LitAdapterError(f"{path}: {name!r} must be an integer, got {cfg[name]!r}")
    raise LitAdapterError(f"{path}: required integer {names[0]!r} is missing")


def rope_fields(cfg: HFConfig, path: Path) -> dict[str, Any]:
    """rope_theta and rope_scaling from transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x (`rope_parameters`),
    with transformers' own precedence (rope_scaling over rope_parameters, their rope_theta over the top-level one)."""
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise LitAdapterError(f"{path}: rope_parameters must be one flat mapping; per-layer RoPE is not supported")
    if params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise LitAdapterError(f"{path}: partial_rotary_factor is not supported; RoPE must rotate the whole head")
    theta = float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return dict(rope_theta=theta, rope_scaling=None)
    if kind != "llama3":
        raise LitAdapterError(f"{path}: RoPE scaling {kind!r} is not supported; plain RoPE and 'llama3' convert")
    names = {"factor": "factor", "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
             "original_max_seq_len": "original_max_position_embeddings"}
    missing = [hf for hf in names.values() if not isinstance(params.get(hf), (int, float))]
    if missing:
        raise LitAdapterError(f"{path}: RoPE scaling 'llama3' needs a number {missing[0]!r} in rope_scaling")
    scaling = {ours: float(params[hf]) for ours, hf in names.items()}
    scaling["original_max_seq_len"] = int(scaling["original_max_seq_len"])
    return dict(rope_theta=theta, rope_scaling={"rope_type": "llama3", **scaling})


def llama_style(cfg: HFConfig, path: Path) -> dict[str, Any]:
    """The fields every Llama-style config.json states."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise LitAdapterError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported; this family uses silu")
    heads = require_int(cfg, path, "num_attention_heads")
    return dict(
        vocab_size=require_int(cfg, path, "vocab_size"), dim=require_int(cfg, path, "hidden_size"),
        n_layers=require_int(cfg, path, "num_hidden_layers"), n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads, hidden_dim=require_int(cfg, path, "intermediate_size"),
        head_dim=cfg.get("head_dim"), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(cfg.get("max_position_embeddings") or 2048),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), **rope_fields(cfg, path),
    )


def llama_config(cfg: HFConfig, path: Path) -> dict[str, Any]:
    bias = (ATTENTION_BIAS if cfg.get("attention_bias") else []) + (["w1", "w2", "w3"] if cfg.get("mlp_bias") else [])
    return dict(llama_style(cfg, path), linear_bias=bias)


def mistral_config(cfg: HFConfig, path: Path) -> dict[str, Any]:
    fields = llama_style(cfg, path)
    window = cfg.get("sliding_window")
    if window:  # within the window, sliding-window attention is plain causal attention: the context stops there
        fields["max_seq_len"] = min(fields["max_seq_len"], int(window))
    return fields


def qwen_config(cfg: HFConfig, path: Path, qk_norm: bool) -> dict[str, Any]:
    if cfg.get("use_sliding_window"):
        raise LitAdapterError(f"{path}: use_sliding_window is not supported; only full attention converts")
    # Qwen2 always has q/k/v biases (its config has no switch); Qwen3 has attention_bias, false in every release
    bias = (ATTENTION_BIAS if cfg.get("attention_bias") else []) if qk_norm else ["wq", "wk", "wv"]
    return dict(llama_style(cfg, path), linear_bias=bias, qk_norm=qk_norm)


def falcon_layout(cfg: HFConfig, path: Path) -> str:
    """Which of FALCON_NORMS the config describes."""
    new = bool(cfg.get("new_decoder_architecture"))
    parallel = cfg.get("parallel_attn", True)
    if new and not parallel:
        raise LitAdapterError(f"{path}: new_decoder_architecture with parallel_attn false is not supported")
    if not parallel:
        return "sequential"
    return "parallel" if (cfg.get("num_ln_in_parallel_attn") or (2 if new else 1)) == 2 else "shared"


def falcon_config(cfg: HFConfig, path: Path) -> dict[str, Any]:
    if cfg.get("alibi"):
        raise LitAdapterError(f"{path}: Falcon with ALiBi positions (alibi: true) is not supported; only rotary "
                              "Falcon converts")
    if cfg.get("activation", "gelu") != "gelu":
        raise LitAdapterError(f"{path}: activation {cfg['activation']!r} is not supported; Falcon uses gelu")
    if cfg.get("apply_residual_connection_post_layernorm"):
        raise LitAdapterError(f"{path}: apply_residual_connection_post_layernorm is not supported")
    dim = require_int(cfg, path, "hidden_size", "n_embed")
    heads = require_int(cfg, path, "num_attention_heads", "n_head")
    if cfg.get("new_decoder_architecture"):
        kv_heads = cfg.get("num_kv_heads") or cfg.get("n_head_kv") or heads
    else:  # multi-query: one key/value head; otherwise one per query head, fused per head
        kv_heads = 1 if cfg.get("multi_query", True) else heads
    layout = falcon_layout(cfg, path)
    return dict(
        vocab_size=require_int(cfg, path, "vocab_size"), dim=dim,
        n_layers=require_int(cfg, path, "num_hidden_layers", "n_layer"), n_heads=heads, n_kv_heads=kv_heads,
        hidden_dim=cfg.get("ffn_hidden_size") or 4 * dim, norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        max_seq_len=int(cfg.get("max_position_embeddings") or 2048),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)), norm="layernorm", mlp="gelu",
        parallel_residual=layout != "sequential", shared_norm=layout == "shared",
        linear_bias=["wq", "wk", "wv", "wo", "w1", "w2"] if cfg.get("bias") else [], **rope_fields(cfg, path),
    )


def falcon_layer(config: ModelConfig) -> dict[str, str]:
    layout = "sequential" if not config.parallel_residual else "shared" if config.shared_norm else "parallel"
    return {**FALCON_LAYER, **FALCON_NORMS[layout]}


LLAMA = Family("LlamaForCausalLM", ("llama",), llama_config, "model.layers", LLAMA_TOP, lambda c: LLAMA_LAYER)
FAMILIES = (
    LLAMA,
    Family("MistralForCausalLM", ("mistral",), mistral_config, "model.layers", LLAMA_TOP, lambda c: LLAMA_LAYER),
    Family("Qwen2ForCausalLM", ("qwen2",), lambda cfg, path: qwen_config(cfg, path, qk_norm=False), "model.layers",
           LLAMA_TOP, lambda c: LLAMA_LAYER),
    Family("Qwen3ForCausalLM", ("qwen3",), lambda cfg, path: qwen_config(cfg, path, qk_norm=True), "model.layers",
           LLAMA_TOP, lambda c: LLAMA_LAYER),
    Family("FalconForCausalLM", ("falcon",), falcon_config, "transformer.h", FALCON_TOP, falcon_layer),
)


def find_family(cfg: HFConfig, path: Path) -> Family:
    """The family of a config.json, by `architectures` (else `model_type`); the two must agree."""
    architectures = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    known = [f for f in FAMILIES if f.architecture in architectures] if architectures else []
    if not architectures:
        known = [f for f in FAMILIES if model_type in f.model_types]
    family: Optional[Family] = known[0] if known else None
    if family is None or (model_type is not None and model_type not in family.model_types):
        supported = ", ".join(f.architecture for f in FAMILIES)
        raise LitAdapterError(f"{path}: model_type {model_type!r} / architectures {architectures} is not supported; "
                              f"these convert: {supported} (rotary)")
    return family


def read_family_config(cfg: HFConfig, path: Path) -> tuple[Family, ModelConfig]:
    family = find_family(cfg, path)
    fields = family.read_config(cfg, path)
    try:
        config = ModelConfig(name=path.parent.name, **fields)
    except LitAdapterError as err:
        raise LitAdapterError(f"{path}: {err}") from None
    return family, config
