"""Hugging Face causal-LM folders, both ways: config.json + safetensors or pytorch_model.bin, sharded or not.

The architectures that convert, and where each weight sits, are in `families.py` (Llama 1-3, Mistral, Qwen2, Qwen3,
Falcon). Hugging Face's rotate-half RoPE wants the rows of each q/k head ordered (all even pair members, then all odd
ones); Meta's interleaved RoPE (ours) keeps the pairs adjacent. Loading undoes that row permutation head by head (wk
has n_kv_heads heads), for q/k biases too and, with one head, for Qwen3's per-head q/k norm weights;
`to_hf_state_dict` applies it (LlamaForCausalLM export).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from lit_adapter.checkpoint import expected_shapes
from lit_adapter.config import ModelConfig
from lit_adapter.convert.families import LLAMA, Family, read_family_config
from lit_adapter.convert.files import WeightsFile, chunks, read_json_object
from lit_adapter.convert.meta import with_known_name
from lit_adapter.errors import LitAdapterError

CONFIG_FILE = "config.json"
# (index file, single file), in order of preference
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older saves include
Plan = dict[str, list[str]]  # HF key -> our keys it holds (three for Falcon's fused query_key_value)


def load_hf(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face folder of a supported family into (config, state dict in Meta layout and names)."""
    folder = Path(folder)
    family, config = read_hf_family(folder / CONFIG_FILE)
    plan = weight_plan(config, family)
    files = [WeightsFile(path) for path in weight_files(folder)]
    sources = locate_weights(files, plan, config, family)
    check_shapes(sources, plan, config, folder)
    state: dict[str, torch.Tensor] = {}
    for weights in files:
        wanted = [hf_key for hf_key, source in sources.items() if source is weights]
        for group in chunks(wanted, weights.nbytes):
            with weights.open() as tensors:
                for hf_key in group:
                    state.update(from_hf_tensor(plan[hf_key], tensors[hf_key], config))
    return config, state


def read_hf_config(path: Path) -> ModelConfig:
    """config.json -> ModelConfig, refusing what our model cannot represent."""
    return read_hf_family(path)[1]


def read_hf_family(path: Path) -> tuple[Family, ModelConfig]:
    cfg = read_json_object(path, "a Hugging Face checkpoint folder needs its config.json")
    family, config = read_family_config(cfg, path)
    return family, with_known_name(config)


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


def weight_plan(config: ModelConfig, family: Family) -> Plan:
    """Every HF key the model needs -> the keys of ours it holds, in our module order (fused: wq, wk, wv)."""
    plan: Plan = {}
    for key in expected_shapes(config):
        plan.setdefault(family.hf_key(key, config), []).append(key)
    return plan


def to_hf_key(key: str, config: Optional[ModelConfig] = None, family: Family = LLAMA) -> str:
    """The HF key of our weight `key` (LlamaForCausalLM by default)."""
    return family.hf_key(key, config)


def locate_weights(files: list[WeightsFile], plan: Plan, config: ModelConfig, family: Family) -> dict[str, WeightsFile]:
    """HF key -> the file holding it, for every key of the plan; unknown names fail naming their file."""
    sources: dict[str, WeightsFile] = {}
    tied_copy = family.top["output.weight"] if config.tie_embeddings else None
    for weights in files:
        for hf_key in weights.keys():
            if hf_key.endswith(IGNORED_SUFFIXES) or hf_key == tied_copy:
                continue  # a tied classifier: some saves store the copy anyway
            if hf_key not in plan:
                raise LitAdapterError(f"{weights.path}: unexpected weight {hf_key!r} for {family.architecture} "
                                      f"with this config.json ({config.n_layers} layers)")
            if hf_key in sources:
                raise LitAdapterError(f"{weights.path}: weight {hf_key!r} also appears in {sources[hf_key].path.name}")
            sources[hf_key] = weights
    return sources


def check_shapes(sources: dict[str, WeightsFile], plan: Plan, config: ModelConfig, folder: Path) -> None:
    missing = [hf_key for hf_key in plan if hf_key not in sources]
    if missing:
        raise LitAdapterError(f"{folder}: missing weight {missing[0]!r} ({len(missing)} missing in all)")
    expected = expected_shapes(config)
    for hf_key, weights in sources.items():
        shapes = [expected[key] for key in plan[hf_key]]
        want = [sum(shape[0] for shape in shapes), *shapes[0][1:]]  # fused rows stack along the first axis
        got = list(weights.shapes[hf_key])
        if got != want:
            raise LitAdapterError(
                f"{weights.path}: weight {hf_key!r} has shape {got}, expected {want} from config.json"
            )


def from_hf_tensor(keys: list[str], tensor: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our tensors (fresh copies: no reference to the mapped file remains) for one HF tensor holding `keys`."""
    parts = split_fused_qkv(tensor, config) if len(keys) > 1 else (tensor,)
    return {key: interleaved_rows(key, part, config) for key, part in zip(keys, parts, strict=True)}


def split_fused_qkv(tensor: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Falcon's query_key_value [(heads + 2 kv_heads) * head_dim, ...] -> wq, wk, wv: per KV head, its group's query
    heads, then its key head, then its value head."""
    groups, hd = config.n_heads // config.n_kv_heads, config.head_dim
    fused = tensor.reshape(config.n_kv_heads, groups + 2, hd, *tensor.shape[1:])  # (kv, groups + 2, hs, ...)
    rows = (-1, *tensor.shape[1:])
    return fused[:, :groups].reshape(rows), fused[:, groups].reshape(rows), fused[:, groups + 1].reshape(rows)


def interleaved_rows(key: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """q/k weights and biases (and Qwen3's q/k norms, one head) in our RoPE row order; anything else as it is."""
    module = key.rsplit(".", 2)[-2]
    heads = {"wq": config.n_heads, "wk": config.n_kv_heads, "q_norm": 1, "k_norm": 1}.get(module)
    return unpermute(tensor, heads) if heads is not None else tensor.clone()


def permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> Hugging Face row order of a q/k projection [n_heads * head_dim, ...] (a weight or a bias)."""
    rows, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *rest).transpose(1, 2).reshape(weight.shape).contiguous()


def unpermute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face -> Meta row order of a q/k projection [n_heads * head_dim, ...] (a weight or a bias)."""
    rows, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *rest).transpose(1, 2).reshape(weight.shape).contiguous()


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our (Meta-layout) state dict -> a Llama-style model's (LlamaForCausalLM, Mistral, Qwen2/3 names); the tied
    classifier is left out when tied."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key == "output.weight" and config.tie_embeddings:
            continue
        module = key.rsplit(".", 2)[-2]
        heads = {"wq": config.n_heads, "wk": config.n_kv_heads, "q_norm": 1, "k_norm": 1}.get(module)
        out[to_hf_key(key, config)] = permute(tensor, heads) if heads is not None else tensor
    return out


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """config.json for a LlamaForCausalLM with this architecture (readable by transformers 4.x and 5.x)."""
    attention, mlp = {"wq", "wk", "wv", "wo"}, {"w1", "w2", "w3"}
    bias = set(config.linear_bias)
    attention_bias, mlp_bias = attention <= bias, mlp <= bias
    llama_bias = bias == (attention if attention_bias else set()) | (mlp if mlp_bias else set())
    if not llama_bias or config.norm != "rmsnorm" or config.mlp != "swiglu" or config.parallel_residual or (
            config.qk_norm):
        raise LitAdapterError(f"{config.name}: only Llama-shaped models export to LlamaForCausalLM")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        scaling = dict(config.rope_scaling)
        scaling["original_max_position_embeddings"] = scaling.pop("original_max_seq_len")
        rope = {**scaling, "rope_theta": config.rope_theta}
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
        "rope_parameters": rope,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": attention_bias,
        "mlp_bias": mlp_bias,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
