"""Folding an adapter into plain linears: y = W' x + b' (linear.py's equation), for files and for loaded models.

- `fold_adapter` / `merge` (the `lit-adapter merge` command): an adapter file's bias scales, LoRA and trained norms
  go into the base weights of a new checkpoint folder; prompts, gates and biases remain as a small adapter. Where
  the base linear has its own bias b0 (Qwen2, Falcon), the merged base holds s_out * b0 and the adapter s_out * b.
- `merge_linears`: the same fold on a loaded AdapterModel, in place, so decoding runs one matmul per linear (its
  bias is b0' + b').

Both keep apart the LoRA that the prompts' keys/values must bypass (`unfolded_lora`), so they compute the same model.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional

import torch

from lit_adapter.adapters.config import LINEAR_NAMES, AdapterConfig
from lit_adapter.adapters.formats import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterFile,
    Tensors,
    check_adapter_tensors,
    read_adapter,
    write_adapter,
)
from lit_adapter.adapters.linear import (
    SCALE_SIDES,
    AdaptedLinear,
    fold_linear,
    linear_parent,
    lora_scaling,
    out_scaled,
    parent_of,
)
from lit_adapter.adapters.model import AdapterModel, adapter_shapes
from lit_adapter.checkpoint import load_config, load_weights, save_checkpoint
from lit_adapter.config import ModelConfig
from lit_adapter.errors import LitAdapterError
from lit_adapter.tokenizer import find_tokenizer_file

# what merging leaves of each bias mode once the scales are folded into the base weights
MERGED_BIAS_MODE = {"none": "none", "paper": "bias", "official_7b": "official_7b", "official_65b": "bias",
                    "bias": "bias"}
PROMPT_KV_LINEARS = ("wk", "wv")  # the projections of the prompts' keys and values


def unfolded_lora(config: AdapterConfig, n_layers: int) -> tuple[str, ...]:
    """The linears whose LoRA stays apart when folding: wk/wv, when the adapter has prompts whose keys/values skip
    LoRA (`prompt_kv_lora` False); folded, the prompts would see it. Without prompts nothing bypasses LoRA."""
    if not config.lora_rank or config.prompt_kv_lora:
        return ()
    if not (config.static_layers(n_layers) or config.visual_prompt_layers(n_layers)):
        return ()
    return tuple(name for name in config.lora_targets if name in PROMPT_KV_LINEARS)


def merge_linears(model: AdapterModel) -> int:
    """Fold bias/scale and LoRA of `model`'s adapted linears into plain nn.Linear modules (y = W'x + b'), in place.

    The linears of `unfolded_lora` stay adapted. Returns the number of linears folded.
    """
    keep = unfolded_lora(model.adapter_config, model.config.n_layers)
    folded = 0
    for block in model.llama.layers:
        for name in LINEAR_NAMES:
            parent = parent_of(block, name)
            module = getattr(parent, name)
            if not isinstance(module, AdaptedLinear) or (name in keep and module.lora_rank):
                continue
            setattr(parent, name, plain_linear(*module.folded()))
            folded += 1
    return folded


def plain_linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.nn.Linear:
    """A frozen nn.Linear holding `weight` [out, in] (and `bias` [out], cast to the weight's dtype)."""
    with torch.device("meta"):
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias.to(weight.dtype), requires_grad=False)
    return linear


def fold_adapter(weights: Tensors, adapter: AdapterFile, base: ModelConfig,
                 progress: bool = False) -> tuple[Tensors, Tensors, AdapterConfig]:
    """Fold bias scales, LoRA and trained norms into the base weights; `progress`: count the layers on a bar
    (stderr, shown only on a terminal).

    Returns (base weights, the adapter tensors that remain (prompts, gates, biases, visual, `unfolded_lora`),
    their config).
    """
    from tqdm import tqdm

    config, tensors = adapter.config, dict(adapter.tensors)
    merged = dict(weights)
    keep_lora = unfolded_lora(config, base.n_layers)
    scaling = lora_scaling(config.lora_alpha, config.lora_rank)
    remaining: Tensors = {}
    layers = tqdm(range(base.n_layers), desc="folding", unit="layer", disable=None if progress else True, leave=False)
    for i in layers:
        for name in LINEAR_NAMES:
            stem = f"layers.{i}.{linear_parent(name)}.{name}"
            parts = {p: tensors.pop(f"llama.{stem}.{p}", None) for p in ("bias", "scale", "lora_l1", "lora_l2")}
            if all(v is None for v in parts.values()):
                continue
            fold_lora = name not in keep_lora
            scale_side = SCALE_SIDES.get(config.bias_mode)
            w, b0 = fold_linear(
                weights[f"{stem}.weight"], scale=parts["scale"], scale_side=scale_side,
                lora_l1=parts["lora_l1"] if fold_lora else None, lora_l2=parts["lora_l2"] if fold_lora else None,
                lora_scaling=scaling, base_bias=weights.get(f"{stem}.bias"),
            )
            merged[f"{stem}.weight"] = w
            if b0 is not None:
                merged[f"{stem}.bias"] = b0  # the base's own bias, scaled as its output: s_out * b0
            if parts["bias"] is not None:
                remaining[f"llama.{stem}.bias"] = out_scaled(parts["bias"], parts["scale"], scale_side).to(
                    parts["bias"].dtype)  # s_out * b
            if not fold_lora and parts["lora_l1"] is not None:
                remaining[f"llama.{stem}.lora_l1"] = parts["lora_l1"]
                remaining[f"llama.{stem}.lora_l2"] = parts["lora_l2"]
    for key in [k for k in tensors if k.startswith("llama.") and k.endswith(("norm.weight", "norm.bias"))]:
        stem = key.removeprefix("llama.")
        merged[stem] = tensors.pop(key).to(weights[stem].dtype)
    remaining.update(tensors)
    rest = dataclasses.replace(
        config, bias_mode=MERGED_BIAS_MODE[config.bias_mode], train_norms=False,
        lora_rank=config.lora_rank if keep_lora else 0, lora_targets=list(keep_lora or LINEAR_NAMES),
        lora_alpha=config.lora_alpha if keep_lora else None,
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
    check_adapter_tensors(adapter_file, adapter_shapes(base, adapter_file.config))
    merged, remaining, rest = fold_adapter(load_weights(checkpoint_dir, base), adapter_file, base, progress=True)
    save_checkpoint(out_dir, merged, base, find_tokenizer_file(checkpoint_dir))
    for stale in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        (out_dir / stale).unlink(missing_ok=True)
    if remaining:
        write_adapter(out_dir, rest, remaining, base)
    kept = f"{len(remaining)} adapter tensors remain in {out_dir / ADAPTER_WEIGHTS}" if remaining else "no adapter left"
    print(f"merged {adapter_file.path} into {out_dir}; {kept}", file=sys.stderr)
