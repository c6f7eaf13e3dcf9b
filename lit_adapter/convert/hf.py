"""Hugging Face `LlamaForCausalLM` folders, both ways: config.json + safetensors or pytorch_model.bin, sharded or not.

Hugging Face's rotate-half RoPE wants the rows of each q/k head ordered (all even pair members, then all odd ones);
Meta's interleaved RoPE (ours) keeps the pairs adjacent. Loading undoes that row permutation head by head (wk has
n_kv_heads heads); `to_hf_state_dict` applies it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from lit_adapter.checkpoint import expected_shapes
from lit_adapter.config import ModelConfig
from lit_adapter.convert.files import WeightsFile, chunks, read_json_object
from lit_adapter.convert.meta import with_known_name
from lit_adapter.errors import LitAdapterError

CONFIG_FILE = "config.json"
# (index file, single file), in order of preference
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
TOP_KEYS = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight"}
LAYER_KEYS = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older saves include


def load_hf(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face LlamaForCausalLM folder into (config, state dict in Meta layout and names)."""
    folder = Path(folder)
    config = read_hf_config(folder / CONFIG_FILE)
    files = [WeightsFile(path) for path in weight_files(folder)]
    sources = locate_weights(files, config)
    check_shapes(sources, config, folder)
    state: dict[str, torch.Tensor] = {}
    for weights in files:
        wanted = {hf_key: key for key, (source, hf_key) in sources.items() if source is weights}
        for group in chunks(wanted, weights.nbytes):
            with weights.open() as tensors:
                for hf_key in group:
                    state[wanted[hf_key]] = from_hf_tensor(wanted[hf_key], tensors[hf_key], config)
    return config, state


def read_hf_config(path: Path) -> ModelConfig:
    """config.json -> ModelConfig, refusing what our LLaMA cannot represent."""
    cfg = read_json_object(path, "a Hugging Face checkpoint folder needs its config.json")
    if cfg.get("model_type") != "llama" or "LlamaForCausalLM" not in (cfg.get("architectures") or ["LlamaForCausalLM"]):
        raise LitAdapterError(
            f"{path}: model_type {cfg.get('model_type')!r} / architectures {cfg.get('architectures')} is not "
            "supported; only LlamaForCausalLM (model_type 'llama') converts"
        )
    check_supported(cfg, path)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(cfg.get(key), int):
            raise LitAdapterError(f"{path}: required integer {key!r} is missing or not an integer")
    rope = cfg.get("rope_parameters") or {}
    try:
        config = ModelConfig(
            name=path.parent.name, vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            hidden_dim=cfg["intermediate_size"], norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except LitAdapterError as err:
        raise LitAdapterError(f"{path}: {err}") from None
    return with_known_name(config)


def check_supported(cfg: dict[str, Any], path: Path) -> None:
    for field in ("rope_parameters", "rope_scaling"):  # transformers 5.x and 4.x names
        rope = cfg.get(field) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
        if rope_type != "default":
            raise LitAdapterError(f"{path}: RoPE scaling {rope_type!r} is not supported; only plain RoPE converts")
    if cfg.get("hidden_act", "silu") != "silu":
        raise LitAdapterError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported; LLaMA uses silu")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise LitAdapterError(f"{path}: attention_bias / mlp_bias are not supported; LLaMA has no biases")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim * cfg.get("num_attention_heads", 0) != cfg.get("hidden_size"):
        raise LitAdapterError(f"{path}: head_dim {head_dim} x num_attention_heads must equal hidden_size")


def weight_files(folder: Path) -> list[Path]:
    for index_name, single_name in WEIGHT_LAYOUTS:
        index = folder / index_name
        if index.is_file():
            return index_files(index)
        if (folder / single_name).is_file():
            return [folder / single_name]
    raise LitAdapterError(
        f"{folder}: no weights found; expected model.safetensors, pytorch_model.bin or their sharded .index.json"
    )


def index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise LitAdapterError(f"{index}: not a valid index (expected a JSON object with a 'weight_map')") from None
    for name in names:
        if not (index.parent / name).is_file():
            raise LitAdapterError(f"{index.parent / name}: missing; {index.name} lists it")
    return [index.parent / name for name in names]


def to_meta_key(hf_key: str) -> Optional[str]:
    """Our name for a Hugging Face weight name; None for one we do not know."""
    if hf_key in TOP_KEYS:
        return TOP_KEYS[hf_key]
    parts = hf_key.split(".")
    if len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[5] == "weight":
        module = LAYER_KEYS.get(f"{parts[3]}.{parts[4]}")
        return f"layers.{parts[2]}.{module}.weight" if module else None
    if len(parts) == 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[4] == "weight":
        module = LAYER_KEYS.get(parts[3])
        return f"layers.{parts[2]}.{module}.weight" if module else None
    return None


def to_hf_key(key: str) -> str:
    inverse_top = {v: k for k, v in TOP_KEYS.items()}
    if key in inverse_top:
        return inverse_top[key]
    _, layer, *module, _ = key.split(".")
    inverse_layer = {v: k for k, v in LAYER_KEYS.items()}
    return f"model.layers.{layer}.{inverse_layer['.'.join(module)]}.weight"


def locate_weights(files: list[WeightsFile], config: ModelConfig) -> dict[str, tuple[WeightsFile, str]]:
    """Our key -> (file, Hugging Face key) for every weight to load; unknown names fail naming their file."""
    sources: dict[str, tuple[WeightsFile, str]] = {}
    for weights in files:
        for hf_key in weights.keys():
            if hf_key.endswith(IGNORED_SUFFIXES):
                continue
            key = to_meta_key(hf_key)
            if key is None:
                raise LitAdapterError(f"{weights.path}: unexpected weight {hf_key!r} for LlamaForCausalLM")
            if key == "output.weight" and config.tie_embeddings:
                continue  # tied to the embedding: some saves store the copy anyway
            if key in sources:
                raise LitAdapterError(f"{weights.path}: weight {hf_key!r} also appears in {sources[key][0].path.name}")
            sources[key] = (weights, hf_key)
    return sources


def check_shapes(sources: dict[str, tuple[WeightsFile, str]], config: ModelConfig, folder: Path) -> None:
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in sources]
    if missing:
        raise LitAdapterError(f"{folder}: missing weight {to_hf_key(missing[0])!r} ({len(missing)} missing in all)")
    for key, (weights, hf_key) in sources.items():
        if key not in expected:
            raise LitAdapterError(f"{weights.path}: unexpected weight {hf_key!r} (config.json has "
                                  f"{config.n_layers} layers)")
        got = list(weights.shapes[hf_key])
        if got != list(expected[key]):
            raise LitAdapterError(
                f"{weights.path}: weight {hf_key!r} has shape {got}, expected {list(expected[key])} from config.json"
            )


def from_hf_tensor(key: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Our tensor for one weight, as a fresh copy (no reference to the mapped file remains)."""
    if key.endswith("attention.wq.weight"):
        return unpermute(tensor, config.n_heads)
    if key.endswith("attention.wk.weight"):
        return unpermute(tensor, config.n_kv_heads)
    return tensor.clone()


def permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> Hugging Face row order of a q/k projection [n_heads * head_dim, dim]."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def unpermute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face -> Meta row order of a q/k projection [n_heads * head_dim, dim]."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our (Meta-layout) state dict -> LlamaForCausalLM's; the tied classifier is left out when tied."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key == "output.weight" and config.tie_embeddings:
            continue
        if key.endswith("attention.wq.weight"):
            tensor = permute(tensor, config.n_heads)
        elif key.endswith("attention.wk.weight"):
            tensor = permute(tensor, config.n_kv_heads)
        out[to_hf_key(key)] = tensor
    return out


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """config.json for a LlamaForCausalLM with this architecture (readable by transformers 4.x and 5.x)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
