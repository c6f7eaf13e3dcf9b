"""Hugging Face causal-LM folders, both ways: config.json + safetensors or pytorch_model.bin, sharded or not.

The architectures that convert, and where each weight sits, are in `families.py` (Llama 1-3, Mistral, Qwen2, Qwen3,
Falcon). Hugging Face's rotate-half RoPE wants the rows of each q/k head ordered (all even pair members, then all odd
ones); Meta's interleaved RoPE (ours) keeps the pairs adjacent. Loading undoes that row permutation head by head (wk
has n_kv_heads heads), for q/k biases too and, with one head, for Qwen3's per-head q/k norm weights;
`to_hf_state_dict` applies it (LlamaForCausalLM export).

Export (`lit-adapter export --format hf`): `export_family` picks the family whose transformers class computes what a
config computes (with the biases an adapter left, padded with zeros where that class has a bias on a group of
linears), `export_state_dict` writes every family's names (Falcon's fused query_key_value included),
`export_config_dict` its config.json and `write_hf_folder` the whole folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from lit_adapter.checkpoint import expected_shapes
from lit_adapter.config import ModelConfig
from lit_adapter.convert.families import FAMILIES, LLAMA, Family, read_family_config
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
    rope = rope_parameters(config)
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


def rope_parameters(config: ModelConfig) -> dict[str, Any]:
    """transformers 5's `rope_parameters` of a config (plain RoPE or Llama 3.1's scaling)."""
    if config.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    scaling = dict(config.rope_scaling)
    scaling["original_max_position_embeddings"] = scaling.pop("original_max_seq_len")
    return {**scaling, "rope_theta": config.rope_theta}


# ---- export: our checkpoint -> the transformers folder of the family that computes the same model ----

ATTENTION_LINEARS = ("wq", "wk", "wv", "wo")
MLP_LINEARS = ("w1", "w2", "w3")
FALCON_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2")


def family_named(architecture: str) -> Family:
    return next(f for f in FAMILIES if f.architecture == architecture)


def export_family(config: ModelConfig, architecture: Optional[str] = None) -> tuple[Family, ModelConfig]:
    """The family whose transformers class computes `config`'s model, and `config` with the biases that class gives
    its linears (transformers switches biases per group of linears: the ones `config` lacks are written as zeros).

    `architecture` forces a Llama-style class (PEFT's AdaptionPrompt knows LlamaForCausalLM, not Qwen2's); the
    default is Qwen2/Qwen3 where their fields say so, Falcon for the LayerNorm + GELU models, else Llama.
    """
    bias = set(config.linear_bias)
    name = config.name
    if config.norm == "layernorm" or config.mlp == "gelu" or config.parallel_residual:
        if not (config.norm == "layernorm" and config.mlp == "gelu") or config.qk_norm:
            raise LitAdapterError(f"{name}: no transformers class has this mix of norm {config.norm!r}, mlp "
                                  f"{config.mlp!r}, parallel_residual {config.parallel_residual} and qk_norm")
        if config.rope_scaling is not None or config.head_dim * config.n_heads != config.dim:
            raise LitAdapterError(f"{name}: FalconForCausalLM has plain RoPE and head_dim = dim / n_heads; this "
                                  "model has RoPE scaling or other heads")
        if not config.parallel_residual and config.n_kv_heads not in (1, config.n_heads):
            raise LitAdapterError(f"{name}: FalconForCausalLM with sequential attention and MLP has one KV head or "
                                  f"one per query head, not {config.n_kv_heads}")
        return family_named("FalconForCausalLM"), with_bias(config, FALCON_LINEARS if bias else ())
    if config.norm != "rmsnorm" or config.mlp != "swiglu":
        raise LitAdapterError(f"{name}: no transformers class has norm {config.norm!r} with mlp {config.mlp!r}")
    if config.qk_norm:
        extra = sorted(bias & set(MLP_LINEARS))
        if extra:
            raise LitAdapterError(f"{name}: {', '.join(extra)} carry a bias here, but Qwen3ForCausalLM (the class "
                                  "with per-head q/k norms) has none on its MLP linears; train without MLP biases "
                                  "(bias_mode none) or evaluate the adapter with `lit-adapter eval lm-eval`")
        return family_named("Qwen3ForCausalLM"), with_bias(config, ATTENTION_LINEARS if bias else ())
    if architecture is None and bias == {"wq", "wk", "wv"}:
        return family_named("Qwen2ForCausalLM"), config
    linears = (ATTENTION_LINEARS if bias & set(ATTENTION_LINEARS) else ()) + (
        MLP_LINEARS if bias & set(MLP_LINEARS) else ())
    return family_named(architecture or "LlamaForCausalLM"), with_bias(config, linears)


def with_bias(config: ModelConfig, linears: tuple[str, ...]) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(config, linear_bias=[n for n in config.linears() if n in linears])


def pad_biases(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """`state` with a zero bias for every linear `config` gives one and `state` has none."""
    out = dict(state)
    for i in range(config.n_layers):
        for name in config.linear_bias:
            parent = "attention" if name in ATTENTION_LINEARS else "feed_forward"
            weight = out[f"layers.{i}.{parent}.{name}.weight"]
            out.setdefault(f"layers.{i}.{parent}.{name}.bias", weight.new_zeros(weight.shape[0]))
    return out


def rotate_half_rows(key: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """q/k weights and biases (and q/k norms, one head) in Hugging Face's rotate-half row order."""
    module = key.rsplit(".", 2)[-2]
    heads = {"wq": config.n_heads, "wk": config.n_kv_heads, "q_norm": 1, "k_norm": 1}.get(module)
    return permute(tensor, heads) if heads is not None else tensor


def fuse_qkv(parts: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """wq, wk, wv -> Falcon's query_key_value (the inverse of `split_fused_qkv`)."""
    q, k, v = parts
    rest = tuple(q.shape[1:])
    groups, hd = config.n_heads // config.n_kv_heads, config.head_dim
    fused = torch.cat([q.reshape(config.n_kv_heads, groups, hd, *rest), k.reshape(config.n_kv_heads, 1, hd, *rest),
                       v.reshape(config.n_kv_heads, 1, hd, *rest)], dim=1)
    return fused.reshape(-1, *rest).contiguous()


def export_state_dict(state: dict[str, torch.Tensor], config: ModelConfig, family: Family) -> dict[str, torch.Tensor]:
    """Our state dict (every weight `config` has; the tied classifier may be absent) -> `family`'s."""
    out: dict[str, torch.Tensor] = {}
    for hf_key, keys in weight_plan(config, family).items():
        parts = [rotate_half_rows(key, state[key], config) for key in keys]
        out[hf_key] = fuse_qkv(parts, config) if len(parts) > 1 else parts[0]
    return out


def export_config_dict(config: ModelConfig, family: Family) -> dict[str, Any]:
    """config.json of `family` for `config` (as `export_family` returned them), without token ids and dtype."""
    if family.architecture == "LlamaForCausalLM":
        data = hf_config_dict(config)
        del data["bos_token_id"], data["eos_token_id"]
        return data
    common = {
        "architectures": [family.architecture], "model_type": family.model_types[0], "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads, "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": config.tie_embeddings,
        "rope_theta": config.rope_theta, "rope_parameters": rope_parameters(config),
    }
    if family.architecture == "FalconForCausalLM":
        layout = "sequential" if not config.parallel_residual else "shared" if config.shared_norm else "parallel"
        old = layout == "sequential" or (layout == "shared" and config.n_kv_heads in (1, config.n_heads))
        return {**common, "num_kv_heads": config.n_kv_heads, "new_decoder_architecture": not old,
                "multi_query": config.n_kv_heads == 1, "parallel_attn": layout != "sequential",
                "num_ln_in_parallel_attn": None if layout == "sequential" else 1 if layout == "shared" else 2,
                "bias": bool(config.linear_bias), "alibi": False, "ffn_hidden_size": config.hidden_dim,
                "activation": "gelu", "layer_norm_epsilon": config.norm_eps}
    data = {**common, "intermediate_size": config.hidden_dim, "num_key_value_heads": config.n_kv_heads,
            "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
            "use_sliding_window": False}
    if family.architecture == "Qwen3ForCausalLM":
        data["attention_bias"] = bool(config.linear_bias)
    return data


def write_hf_folder(
    out_dir: Path,
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    family: Family,
    tokenizer: Optional[Path],
    max_shard_size: str = "5GB",
) -> Path:
    """A transformers folder: config.json, model.safetensors (sharded with an index beyond `max_shard_size`),
    generation_config.json and the tokenizer files (a tokenizer_config.json written where the checkpoint has none).
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    from lit_adapter.checkpoint import save_tensors
    from lit_adapter.files import write_json
    from lit_adapter.tokenizer import GENERATION_CONFIG, TOKENIZER_CONFIG, Tokenizer, copy_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = export_state_dict(state, config, family)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    for filename, keys in split.filename_to_tensors.items():
        save_tensors({key: tensors[key] for key in keys}, out_dir / filename, metadata={"format": "pt"})
    if split.is_sharded:
        write_json({"metadata": split.metadata, "weight_map": split.tensor_to_filename},
                   out_dir / "model.safetensors.index.json")
    data = export_config_dict(config, family)
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    ids: dict[str, Any] = {}
    if tokenizer is not None:
        tok = Tokenizer(copy_tokenizer(tokenizer, out_dir))
        stops = list(tok.stop_ids)
        ids = {"bos_token_id": tok.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops or None}
        if not (out_dir / TOKENIZER_CONFIG).is_file():
            write_json(tokenizer_config(tok), out_dir / TOKENIZER_CONFIG)
        if not (out_dir / GENERATION_CONFIG).is_file():
            write_json({**ids, "pad_token_id": tok.pad_id}, out_dir / GENERATION_CONFIG)
    write_json({**data, **ids, "dtype": dtype, "torch_dtype": dtype}, out_dir / CONFIG_FILE)
    return out_dir


def tokenizer_config(tokenizer) -> dict[str, Any]:
    """tokenizer_config.json for a tokenizer file that came without one: its named special tokens, and for
    SentencePiece the class that reads tokenizer.model with BOS first (as `Tokenizer` encodes)."""
    sentencepiece = tokenizer.path.suffix != ".json"
    data: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer" if sentencepiece else "PreTrainedTokenizerFast",
        **tokenizer.special_tokens, "clean_up_tokenization_spaces": False,
    }
    if sentencepiece:
        data.update(add_bos_token=tokenizer.bos_id is not None, add_eos_token=False, legacy=True)
    return data
