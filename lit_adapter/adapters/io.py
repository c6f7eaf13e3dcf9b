"""Adapter files: ours (`adapter.safetensors` + `adapter_config.yaml`), the official LLaMA-Adapter releases, merging.

Official formats read (reference.md §2, §3):
- V1 (flat dict): `adapter_query.weight` [L*K, dim] (block j = layer N-L+j), `layers.{i}.attention.gate` [1,H,1,1]
  or [1]; gates below layer N-L are unused. Their inference multiplies by the raw gate (gate_activation identity).
- V2 (`{'model': sd, 'config': {w_bias, w_lora, lora_rank}}`): `adapter_query.weight`, the visual adapter
  (`clip_proj*`, `visual_query`, `visual_blocks.*`, `visual_proj*`), and under `llama.`: gates, wq/wo/w1/w2/w3 biases,
  norms, `lora_w*_l{1,2}`, `new_gate`. Visual tokens are added to every layer's prompts (late fusion); the prompt
  keys/values skip LoRA, as in the official code.
- 65B chat (`{'model': sd}`): `layers.{i}.attention.wq_bias`, `wq_scale`, ... (y = W(s*x)+b on all seven linears),
  norms, and optionally `adapter_query.weight` with gates on the adapted layers only.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open

from lit_adapter.adapters import AdapterModel, build_adapter_model
from lit_adapter.adapters.config import ATTENTION_LINEARS, LINEAR_NAMES, AdapterConfig
from lit_adapter.adapters.linear import SCALE_SIDES, fold_linear
from lit_adapter.adapters.visual import VisualConfig, clip_embed_dim
from lit_adapter.checkpoint import (
    TOKENIZER_FILE,
    load_config,
    load_model,
    load_weights,
    load_yaml,
    save_checkpoint,
    save_tensors,
    save_yaml,
)
from lit_adapter.config import ModelConfig
from lit_adapter.errors import LitAdapterError, first_line
from lit_adapter.model import LLaMA

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.yaml"
FORMAT = "lit-adapter"
PathLike = Union[str, Path]
Tensors = dict[str, torch.Tensor]

OFFICIAL_VISUAL_PREFIXES = ("clip_proj.", "clip_proj_norm.", "visual_query.", "visual_blocks.", "visual_proj.",
                            "visual_proj_norm.")
# what `merge` leaves of each bias mode once scales are folded into the base weights
MERGED_BIAS_MODE = {"none": "none", "paper": "bias", "official_7b": "official_7b", "official_65b": "bias",
                    "bias": "bias"}


@dataclasses.dataclass
class AdapterFile:
    """An adapter read from disk: its config and tensors named as in AdapterModel (`llama.layers.3...`)."""

    config: AdapterConfig
    tensors: Tensors
    source: Path
    kind: str  # "lit-adapter", "official-v1", "official-v2" or "official-65b"
    origin: dict[str, str] = dataclasses.field(default_factory=dict)  # our key -> the file's key, for messages


# ---------------------------------------------------------------------------------------------------- our format


def save_adapter(model: AdapterModel, out_dir: PathLike) -> Path:
    """Write the adapter's own tensors (`adapter.safetensors`) and config (`adapter_config.yaml`) to out_dir."""
    write_adapter(out_dir, model.adapter_config, model.adapter_state_dict(), model.config)
    return Path(out_dir)


def write_adapter(out_dir: PathLike, config: AdapterConfig, tensors: Tensors, base: ModelConfig) -> None:
    out_dir = Path(out_dir)
    save_tensors(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    header = {"format": FORMAT, "base_model": {"name": base.name, "architecture_hash": base.architecture_hash()}}
    save_yaml({**header, **config.to_dict()}, out_dir / ADAPTER_CONFIG)


def _read_ours(weights: Path, base: ModelConfig) -> AdapterFile:
    config_path = weights.parent / ADAPTER_CONFIG
    data = load_yaml(config_path)
    if data.pop("format", None) != FORMAT:
        raise LitAdapterError(f"{config_path}: not a lit-adapter adapter config (missing `format: {FORMAT}`)")
    made_for = data.pop("base_model", None) or {}
    if made_for.get("architecture_hash") != base.architecture_hash():
        raise LitAdapterError(
            f"{config_path}: the adapter was made for base model {made_for.get('name')!r} (architecture "
            f"{made_for.get('architecture_hash')}), not {base.name!r} ({base.architecture_hash()}); "
            "load it on the base model it was trained on"
        )
    config = AdapterConfig.from_dict(data, source=str(config_path))
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise LitAdapterError(f"{weights}: cannot read safetensors file ({err})") from None
    return AdapterFile(config, tensors, weights, FORMAT)


# ---------------------------------------------------------------------------------------------- official formats


def _read_official(
    path: Path, base: ModelConfig, adapter_len: Optional[int], visual: Optional[VisualConfig]
) -> AdapterFile:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike mean "not a readable checkpoint"
        raise LitAdapterError(f"{path}: cannot read as a PyTorch checkpoint ({first_line(err)})") from None
    if not isinstance(data, dict):
        raise LitAdapterError(f"{path}: expected a state dict, got {type(data).__name__}")
    meta = data.get("config", {}) if isinstance(data.get("model"), dict) else {}
    state = data["model"] if isinstance(data.get("model"), dict) else data
    keys = list(state)
    if any(k.startswith("llama.") or k.startswith(OFFICIAL_VISUAL_PREFIXES) for k in keys):
        return _from_official_v2(state, meta, base, adapter_len, visual, path)
    if any(re.search(r"\.w[qkvo123]_(bias|scale)$", k) for k in keys):
        return _from_official_65b(state, base, path)
    if "adapter_query.weight" in state:
        return _from_official_v1(state, base, adapter_len or 10, path)
    raise LitAdapterError(f"{path}: not a LLaMA-Adapter file (no adapter_query, llama.* or *_bias keys; "
                          f"first key {keys[0] if keys else None!r})")


class _Mapper:
    """Collects official tensors under our names, remembering where each came from."""

    def __init__(self, base: ModelConfig, source: Path) -> None:
        self.base, self.source = base, source
        self.tensors: Tensors = {}
        self.origin: dict[str, str] = {}

    def put(self, ours: str, official: str, tensor: torch.Tensor) -> None:
        self.tensors[ours], self.origin[ours] = tensor, official

    def fail(self, key: str, why: str) -> None:
        raise LitAdapterError(f"{self.source}: key {key!r}: {why}")

    def layer(self, key: str, index: str) -> int:
        i = int(index)
        if i >= self.base.n_layers:
            self.fail(key, f"layer {i} does not exist in {self.base.name!r} ({self.base.n_layers} layers): "
                           "the adapter is for another base model")
        return i

    def prompts(self, key: str, query: torch.Tensor, adapter_len: int) -> int:
        """Split adapter_query [L*K, dim] into the prompts of the top L layers; returns L."""
        rows, n = query.shape[0], self.base.n_layers
        if query.ndim != 2 or query.shape[1] != self.base.dim:
            self.fail(key, f"shape {list(query.shape)} does not fit {self.base.name!r} (dim {self.base.dim})")
        if rows % adapter_len or rows // adapter_len > n:
            self.fail(key, f"{rows} rows are not L x {adapter_len} prompt tokens for L <= {n} layers "
                           "(set adapter_len to the file's prompt length)")
        count = rows // adapter_len
        for j, block in enumerate(query.split(adapter_len)):
            self.put(f"llama.layers.{n - count + j}.attention.adaption_prompt.prompt", key, block)
        return count

    def gate(self, key: str, layer: int, tensor: torch.Tensor, static: range, name: str = "gate") -> None:
        heads = self.base.n_heads if name == "gate" else 1
        if tensor.numel() == 1:  # the first V1 release: one scalar per layer
            tensor = tensor.reshape(1, 1, 1, 1).expand(1, heads, 1, 1).clone()
        if tuple(tensor.shape) != (1, heads, 1, 1):
            self.fail(key, f"shape {list(tensor.shape)}, expected {[1, heads, 1, 1]} for {self.base.name!r}")
        if layer in static:  # the official models keep (unused) gates on layers without prompts
            self.put(f"llama.layers.{layer}.attention.adaption_prompt.{name}", key, tensor)


def _linear_parent(name: str) -> str:
    return "attention" if name in ATTENTION_LINEARS else "feed_forward"


def _from_official_v1(state: Tensors, base: ModelConfig, adapter_len: int, path: Path) -> AdapterFile:
    mapper = _Mapper(base, path)
    count = mapper.prompts("adapter_query.weight", state["adapter_query.weight"], adapter_len)
    static = range(base.n_layers - count, base.n_layers)
    for key, tensor in state.items():
        match = re.fullmatch(r"layers\.(\d+)\.attention\.gate", key)
        if match:
            mapper.gate(key, mapper.layer(key, match[1]), tensor, static)
        elif key != "adapter_query.weight":
            mapper.fail(key, "unexpected in an official V1 adapter file")
    config = AdapterConfig.v1(adapter_len=adapter_len, adapter_layers=count, gate_activation="identity")
    return AdapterFile(config, mapper.tensors, path, "official-v1", mapper.origin)


def _from_official_v2(
    state: Tensors, meta: dict, base: ModelConfig, adapter_len: Optional[int], visual: Optional[VisualConfig], path
) -> AdapterFile:
    mapper = _Mapper(base, path)
    has_visual = any(k.startswith(OFFICIAL_VISUAL_PREFIXES) for k in state)
    if adapter_len is None:
        adapter_len = state["visual_query.weight"].shape[0] if "visual_query.weight" in state else 10
    count = 0
    if "adapter_query.weight" in state:
        count = mapper.prompts("adapter_query.weight", state["adapter_query.weight"], adapter_len)
    static = range(base.n_layers - count, base.n_layers)
    lora_rank, new_gate = 0, False
    for key, tensor in state.items():
        if key == "adapter_query.weight":
            continue
        if key.startswith(OFFICIAL_VISUAL_PREFIXES):
            mapper.put(f"visual.{key}", key, tensor)
            continue
        match = re.fullmatch(r"llama\.layers\.(\d+)\.(.+)", key)
        rest = match[2] if match else None
        if key == "llama.norm.weight" or (rest in ("attention_norm.weight", "ffn_norm.weight")):
            mapper.put(key, key, tensor)
            if match:
                mapper.layer(key, match[1])
        elif rest in ("attention.gate", "attention.new_gate"):
            name = rest.split(".")[1]
            mapper.gate(key, mapper.layer(key, match[1]), tensor, static, name)
            new_gate |= name == "new_gate"
        elif rest and re.fullmatch(r"(attention\.w[qo]|feed_forward\.w[123])\.bias", rest):
            mapper.put(key, key, tensor)
            mapper.layer(key, match[1])
        elif rest and (lora := re.fullmatch(r"(attention|feed_forward)\.lora_(w[qkvo123])_(l[12])\.weight", rest)):
            mapper.put(f"llama.layers.{mapper.layer(key, match[1])}.{lora[1]}.{lora[2]}.lora_{lora[3]}", key, tensor)
            lora_rank = lora_rank or int(tensor.shape[0 if lora[3] == "l1" else 1])
        else:
            mapper.fail(key, "unexpected in an official V2 adapter file")
    if lora_rank and meta.get("lora_rank") not in (None, lora_rank):
        mapper.fail("config.lora_rank", f"{meta['lora_rank']} but the LoRA tensors have rank {lora_rank}")
    config = AdapterConfig(
        adapter_len=adapter_len,
        adapter_layers=count,
        gate_activation="tanh",
        bias_mode="official_7b" if any(k.endswith(".bias") and k.startswith("llama.") for k in state) else "none",
        train_norms=any(k.startswith("llama.") and k.endswith("norm.weight") for k in state),
        lora_rank=lora_rank,
        prompt_kv_lora=False,
        new_gate=new_gate,
        fusion="late",
        visual=(visual or _official_visual_config(state, path)) if has_visual else None,
    )
    return AdapterFile(config, mapper.tensors, path, "official-v2", mapper.origin)


def _official_visual_config(state: Tensors, path: Path) -> VisualConfig:
    """The official 7B visual path: CLIP ViT-L/14 (768-wide features), shapes read from the file."""
    try:
        width = state["visual_query.weight"].shape[1]
        embed = state["clip_proj.weight"].shape[1]
        hidden = state["visual_blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise LitAdapterError(f"{path}: key {err.args[0]!r} missing from the visual adapter") from None
    if embed != clip_embed_dim("ViT-L-14"):
        raise LitAdapterError(f"{path}: key 'clip_proj.weight' takes {embed}-wide CLIP features, not ViT-L-14's; "
                              "pass the visual config of its CLIP model")
    blocks = {int(m[1]) for k in state if (m := re.match(r"visual_blocks\.(\d+)\.", k))}
    return VisualConfig(clip_model="ViT-L-14", clip_pretrained="openai", mode="tokens",
                        visual_len=state["visual_query.weight"].shape[0], n_blocks=len(blocks), block_heads=16,
                        mlp_ratio=hidden / width, width=width)


def _from_official_65b(state: Tensors, base: ModelConfig, path: Path) -> AdapterFile:
    mapper = _Mapper(base, path)
    gates = {int(m[1]): key for key in state if (m := re.fullmatch(r"layers\.(\d+)\.attention\.gate", key))}
    count, adapter_len = 0, 10
    if "adapter_query.weight" in state:
        if not gates:
            mapper.fail("adapter_query.weight", "present without any layers.{i}.attention.gate")
        adapter_len = state["adapter_query.weight"].shape[0] // len(gates)
        count = mapper.prompts("adapter_query.weight", state["adapter_query.weight"], adapter_len)
    static = range(base.n_layers - count, base.n_layers)
    for key, tensor in state.items():
        if key == "adapter_query.weight":
            continue
        if key == "norm.weight":
            mapper.put(f"llama.{key}", key, tensor)
            continue
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        rest = match[2] if match else ""
        linear = re.fullmatch(r"(attention|feed_forward)\.(w[qkvo123])_(bias|scale)", rest)
        if linear:
            mapper.put(f"llama.layers.{mapper.layer(key, match[1])}.{linear[1]}.{linear[2]}.{linear[3]}", key, tensor)
        elif rest in ("attention_norm.weight", "ffn_norm.weight"):
            mapper.put(f"llama.layers.{mapper.layer(key, match[1])}.{rest}", key, tensor)
        elif rest == "attention.gate":
            mapper.gate(key, mapper.layer(key, match[1]), tensor, static)
        else:
            mapper.fail(key, "unexpected in an official 65B (bias/scale) adapter file")
    norms = any(k.endswith("norm.weight") for k in state)
    config = AdapterConfig(adapter_len=adapter_len, adapter_layers=count, gate_activation="tanh",
                           bias_mode="official_65b", train_norms=norms)
    return AdapterFile(config, mapper.tensors, path, "official-65b", mapper.origin)


# ------------------------------------------------------------------------------------------------ reading, loading


def read_adapter(
    path: PathLike, base: ModelConfig, adapter_len: Optional[int] = None, visual: Optional[VisualConfig] = None
) -> AdapterFile:
    """Read our adapter (a folder or its .safetensors) or an official .pth, checked key by key against `base`.

    `adapter_len` (official files): the prompt length K when the file does not show it (V1 default 10).
    `visual` (official V2 files): the visual config, when its CLIP tower is not ViT-L/14 from OpenAI.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise LitAdapterError(f"{path}: no {ADAPTER_WEIGHTS} in this folder; pass an adapter folder or file")
        path = path / ADAPTER_WEIGHTS
    if not path.is_file():
        raise LitAdapterError(f"{path}: adapter file not found")
    if path.suffix == ".safetensors":
        adapter = _read_ours(path, base)
    else:
        adapter = _read_official(path, base, adapter_len, visual)
    adapter.config.check_model(base)
    check_tensors(adapter, expected_shapes(base, adapter.config))
    return adapter


def expected_shapes(base: ModelConfig, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """The name and shape of every adapter tensor of `config` on `base` (built on the meta device)."""
    with torch.device("meta"):
        model = build_adapter_model(LLaMA(base), config, load_clip=False)
    return {name: tuple(param.shape) for name, param in model.adapter_parameters().items()}


def check_tensors(adapter: AdapterFile, expected: dict[str, tuple[int, ...]]) -> None:
    """One line naming the file and the first missing, unexpected or wrongly shaped key."""
    def named(key: str) -> str:
        return repr(adapter.origin.get(key, key))

    for key, tensor in adapter.tensors.items():
        if key not in expected:
            raise LitAdapterError(f"{adapter.source}: unexpected key {named(key)} for this adapter config "
                                  f"({len(expected)} tensors expected)")
        if tuple(tensor.shape) != expected[key]:
            raise LitAdapterError(f"{adapter.source}: key {named(key)} has shape {list(tensor.shape)}, expected "
                                  f"{list(expected[key])}: the adapter is for another base model or config")
    missing = [key for key in expected if key not in adapter.tensors]
    if missing:
        raise LitAdapterError(f"{adapter.source}: missing key {named(missing[0])} ({len(missing)} missing in all)")


def load_adapter(
    model_or_dir: Union[AdapterModel, LLaMA, PathLike],
    path: PathLike,
    adapter_len: Optional[int] = None,
    visual: Optional[VisualConfig] = None,
) -> AdapterModel:
    """Load an adapter file onto a model: an AdapterModel with the same config, a plain LLaMA (the adapter is
    attached to it), or a checkpoint folder. Returns the AdapterModel."""
    if isinstance(model_or_dir, (str, Path)):
        model_or_dir = load_model(model_or_dir)
    base = model_or_dir.config
    adapter = read_adapter(path, base, adapter_len, visual)
    if isinstance(model_or_dir, AdapterModel):
        model = model_or_dir
        _check_same_config(model.adapter_config, adapter.config, adapter.source)
    else:
        model = build_adapter_model(model_or_dir, adapter.config)
    params = model.adapter_parameters()
    check_tensors(adapter, {name: tuple(p.shape) for name, p in params.items()})
    with torch.no_grad():
        for name, tensor in adapter.tensors.items():
            params[name].copy_(tensor)
    return model


def _check_same_config(have: AdapterConfig, got: AdapterConfig, source: Path) -> None:
    ignore = ("visual", "prompt_style")
    for field in dataclasses.fields(AdapterConfig):
        if field.name not in ignore and getattr(have, field.name) != getattr(got, field.name):
            raise LitAdapterError(
                f"{source}: {field.name} is {getattr(got, field.name)!r} but the model was built with "
                f"{getattr(have, field.name)!r}; load the adapter onto the plain base model instead"
            )


# --------------------------------------------------------------------------------------------------------- merge


def fold_adapter(weights: Tensors, adapter: AdapterFile, base: ModelConfig) -> tuple[Tensors, Tensors, AdapterConfig]:
    """Fold bias scales, LoRA and trained norms into the base weights.

    Returns (base weights, the adapter tensors that remain (prompts, gates, biases, visual), their config). LoRA on
    wk/wv stays unfolded when the prompts must bypass it (prompt_kv_lora False).
    """
    config, tensors = adapter.config, dict(adapter.tensors)
    merged = dict(weights)
    has_prompts = any(".adaption_prompt." in key for key in tensors)
    keep_lora = {"wk", "wv"} if has_prompts and not config.prompt_kv_lora else set()
    remaining: Tensors = {}
    for i in range(base.n_layers):
        for name in LINEAR_NAMES:
            stem = f"layers.{i}.{_linear_parent(name)}.{name}"
            parts = {p: tensors.pop(f"llama.{stem}.{p}", None) for p in ("bias", "scale", "lora_l1", "lora_l2")}
            if all(v is None for v in parts.values()):
                continue
            fold_lora = name not in keep_lora
            scaling = 1.0 if config.lora_alpha is None else config.lora_alpha / max(config.lora_rank, 1)
            w, b = fold_linear(
                weights[f"{stem}.weight"], bias=parts["bias"], scale=parts["scale"],
                scale_side=SCALE_SIDES.get(config.bias_mode), lora_l1=parts["lora_l1"] if fold_lora else None,
                lora_l2=parts["lora_l2"] if fold_lora else None, lora_scaling=scaling,
            )
            merged[f"{stem}.weight"] = w
            if b is not None:
                remaining[f"llama.{stem}.bias"] = b
            if not fold_lora and parts["lora_l1"] is not None:
                remaining[f"llama.{stem}.lora_l1"] = parts["lora_l1"]
                remaining[f"llama.{stem}.lora_l2"] = parts["lora_l2"]
    for key in [k for k in tensors if k.startswith("llama.") and k.endswith("norm.weight")]:
        stem = key.removeprefix("llama.")
        merged[stem] = tensors.pop(key).to(weights[stem].dtype)
    remaining.update(tensors)
    kept = [t for t in config.lora_targets if t in keep_lora] if config.lora_rank else []
    rest = dataclasses.replace(
        config, bias_mode=MERGED_BIAS_MODE[config.bias_mode], train_norms=False,
        lora_rank=config.lora_rank if kept else 0, lora_targets=kept or list(LINEAR_NAMES),
        lora_alpha=config.lora_alpha if kept else None,
    )
    return merged, remaining, rest


def merge(checkpoint_dir: Path, adapter: Path, out_dir: Path, adapter_len: Optional[int] = None) -> None:
    """Fold an adapter's bias/scale, LoRA and trained norms into the base weights of a new checkpoint folder.

    The prompts, gates and biases that remain are written to the same folder as a small adapter.

    Args:
        checkpoint_dir: the base model folder (written by `lit-adapter convert`).
        adapter: the adapter folder or its adapter.safetensors, or an official LLaMA-Adapter .pth file.
        out_dir: the new folder: model.safetensors, model_config.yaml, tokenizer.model and, when anything remains,
            adapter.safetensors + adapter_config.yaml (use it as both --checkpoint_dir and --adapter).
        adapter_len: prompt length K of an official V1 file (default 10).
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise LitAdapterError(f"{out_dir}: the output folder must differ from the base checkpoint folder")
    base = load_config(checkpoint_dir)
    adapter_file = read_adapter(adapter, base, adapter_len)
    merged, remaining, rest = fold_adapter(load_weights(checkpoint_dir, base), adapter_file, base)
    tokenizer = checkpoint_dir / TOKENIZER_FILE
    save_checkpoint(out_dir, merged, base, tokenizer if tokenizer.is_file() else None)
    for stale in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        (out_dir / stale).unlink(missing_ok=True)
    if remaining:
        write_adapter(out_dir, rest, remaining, base)
    kept = f"{len(remaining)} adapter tensors remain in {out_dir / ADAPTER_WEIGHTS}" if remaining else "no adapter left"
    print(f"merged {adapter_file.source} into {out_dir}; {kept}", file=sys.stderr)
