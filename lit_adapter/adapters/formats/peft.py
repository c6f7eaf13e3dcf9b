"""PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`, or the older `adapter_model.bin`), both
ways, for the two PEFT tuners that are LLaMA-Adapter mechanisms:

- ADAPTION_PROMPT: `...layers.{i}.self_attn.adaption_prompt` [1, K, dim] and `adaption_gate` [1] on the top L
  layers: our V1 prompts with one raw gate per layer (gate_activation identity, gate_shape layer). PEFT adds
  `o_proj(prompt term)` to the attention output, which is ours only while o_proj has no bias, and projects the
  prompt keys with k_proj alone (no per-head k norm).
- LORA: `...{module}.lora_A.weight` [r, in] (our lora_l1) and `lora_B.weight` [out, r] (lora_l2), scaling
  lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). Hugging Face stores q/k rows for rotate-half RoPE, so the
  q/k `lora_B` rows are permuted per head exactly like the weights (`convert.hf.permute`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import torch

from lit_adapter.adapters.config import LINEAR_NAMES, AdapterConfig
from lit_adapter.adapters.formats.file import AdapterFile, Tensors
from lit_adapter.config import ModelConfig
from lit_adapter.errors import LitAdapterError, first_line

KIND = "peft"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_BIN = "adapter_model.bin"
PREFIX = "base_model.model."
PROMPT_KEY = re.compile(r"base_model\.model\.(?:model\.)?layers\.(\d+)\.self_attn\.(adaption_prompt|adaption_gate)")
LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight")
Files = tuple[dict[str, Any], Tensors]  # (adapter_config.json, adapter_model.safetensors)


def peft_folder(path: Path) -> Optional[Path]:
    """The PEFT folder `path` is or holds its weights, else None (our folders and official files are not)."""
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.name not in (PEFT_WEIGHTS, PEFT_BIN):
        return None
    config = folder / PEFT_CONFIG
    if not config.is_file():
        return None
    try:
        import json

        data = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return folder if isinstance(data, dict) and "peft_type" in data else None


def read(folder: Path, base: ModelConfig) -> AdapterFile:
    """A PEFT ADAPTION_PROMPT or LORA folder, for the base model `base`."""
    from lit_adapter.files import read_json

    config_path = folder / PEFT_CONFIG
    data = read_json(config_path, "PEFT adapter config", expect=dict)
    weights, tensors = load_tensors(folder)
    kind = data.get("peft_type")
    if kind == "ADAPTION_PROMPT":
        return read_adaption_prompt(data, tensors, weights, base)
    if kind == "LORA":
        return read_lora(data, tensors, weights, base)
    raise LitAdapterError(f"{config_path}: peft_type {kind!r} is not a LLaMA-Adapter mechanism; ADAPTION_PROMPT "
                          "and LORA load")


def load_tensors(folder: Path) -> tuple[Path, Tensors]:
    if (folder / PEFT_WEIGHTS).is_file():
        path = folder / PEFT_WEIGHTS
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return path, {key: f.get_tensor(key) for key in f.keys()}
        except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
            raise LitAdapterError(f"{path}: cannot read safetensors file ({first_line(err)})") from None
    path = folder / PEFT_BIN
    if not path.is_file():
        raise LitAdapterError(f"{folder}: no {PEFT_WEIGHTS} (or {PEFT_BIN}) beside {PEFT_CONFIG}")
    from lit_adapter.errors import torch_load_problem

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise LitAdapterError(f"{path}: {torch_load_problem(err)}") from None
    if not isinstance(state, dict):
        raise LitAdapterError(f"{path}: expected a state dict, got {type(state).__name__}")
    return path, state


def fail(path: Path, key: str, why: str) -> None:
    raise LitAdapterError(f"{path}: key {key!r}: {why}")


def read_adaption_prompt(data: dict, tensors: Tensors, path: Path, base: ModelConfig) -> AdapterFile:
    length, layers = data.get("adapter_len"), data.get("adapter_layers")
    if not isinstance(length, int) or not isinstance(layers, int) or length < 1 or layers < 1:
        raise LitAdapterError(f"{path.parent / PEFT_CONFIG}: adapter_len and adapter_layers must be positive integers")
    if layers > base.n_layers:
        raise LitAdapterError(f"{path.parent / PEFT_CONFIG}: adapter_layers {layers} exceeds the {base.n_layers} "
                              f"layers of {base.name!r}: the adapter is for another base model")
    ours: Tensors = {}
    origin: dict[str, str] = {}
    for key, tensor in tensors.items():
        match = PROMPT_KEY.fullmatch(key)
        if match is None:
            fail(path, key, "unexpected in an ADAPTION_PROMPT adapter (expected ...layers.{i}.self_attn."
                            "adaption_prompt / adaption_gate)")
        layer = int(match[1])
        if not base.n_layers - layers <= layer < base.n_layers:
            fail(path, key, f"layer {layer} is not one of the top {layers} of {base.name!r} ({base.n_layers} layers)")
        seam = f"llama.layers.{layer}.attention.adaption_prompt"
        if match[2] == "adaption_prompt":
            if tuple(tensor.shape) != (1, length, base.dim):
                fail(path, key, f"shape {list(tensor.shape)}, expected {[1, length, base.dim]} for {base.name!r}: "
                                "the adapter is for another base model")
            ours[f"{seam}.prompt"], origin[f"{seam}.prompt"] = tensor[0], key
        else:
            if tensor.numel() != 1:
                fail(path, key, f"shape {list(tensor.shape)}, expected [1] (one gate per layer)")
            ours[f"{seam}.gate"], origin[f"{seam}.gate"] = tensor.reshape(1, 1, 1, 1), key
    config = AdapterConfig(adapter_len=length, adapter_layers=layers, gate_activation="identity", gate_shape="layer")
    return AdapterFile(config, ours, path, KIND, origin)


def module_names(base: ModelConfig) -> dict[str, str]:
    """Hugging Face module -> our linear (`layers.{i}.attention.wq`), for the family names of `base`."""
    from lit_adapter.adapters.linear import linear_parent
    from lit_adapter.convert.families import FAMILIES, LLAMA

    family = next(f for f in FAMILIES if f.architecture == "FalconForCausalLM") if base.mlp == "gelu" else LLAMA
    names = {}
    for i in range(base.n_layers):
        for name in base.linears():
            stem = f"layers.{i}.{linear_parent(name)}.{name}"
            names.setdefault(family.hf_key(f"{stem}.weight", base).removesuffix(".weight"), stem)
    return names


def read_lora(data: dict, tensors: Tensors, path: Path, base: ModelConfig) -> AdapterFile:
    from lit_adapter.adapters.linear import linear_parent
    from lit_adapter.checkpoint import expected_shapes
    from lit_adapter.convert.hf import unpermute

    config_path = path.parent / PEFT_CONFIG
    for option, plain in (("use_dora", False), ("fan_in_fan_out", False), ("rank_pattern", {}),
                          ("alpha_pattern", {}), ("modules_to_save", None), ("bias", "none")):
        if data.get(option) not in (plain, None):
            raise LitAdapterError(f"{config_path}: {option} {data[option]!r} is not supported; LoRA loads with "
                                  f"{option} {plain!r}")
    rank = data.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise LitAdapterError(f"{config_path}: r must be a positive integer, got {rank!r}")
    alpha = float(data.get("lora_alpha") or rank)
    if data.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # alpha / sqrt(r) = (alpha sqrt(r)) / r
    modules = module_names(base)
    shapes = expected_shapes(base)
    ours: Tensors = {}
    origin: dict[str, str] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.fullmatch(key)
        stem = modules.get(match[1]) if match else None
        if stem is None:
            fail(path, key, f"not a LoRA on a linear of {base.name!r} ({base.n_layers} layers; Falcon's fused "
                            "query_key_value does not load): the adapter is for another base model")
        if modules_fused(match[1]):
            fail(path, key, "LoRA on Falcon's fused query_key_value does not load; LoRA on dense, dense_h_to_4h "
                            "and dense_4h_to_h does")
        out_features, in_features = shapes[f"{stem}.weight"]
        want = (rank, in_features) if match[2] == "A" else (out_features, rank)
        if tuple(tensor.shape) != want:
            fail(path, key, f"shape {list(tensor.shape)}, expected {list(want)} for {base.name!r} with r {rank}: the "
                            "adapter is for another base model")
        name = stem.rsplit(".", 1)[-1]
        if match[2] == "B" and name in ("wq", "wk"):
            tensor = unpermute(tensor, base.n_heads if name == "wq" else base.n_kv_heads)
        ours[f"llama.{stem}.lora_l{1 if match[2] == 'A' else 2}"] = tensor
        origin[f"llama.{stem}.lora_l{1 if match[2] == 'A' else 2}"] = key
    targets = [n for n in LINEAR_NAMES if any(k.endswith(f".{n}.lora_l1") for k in ours)]
    if not targets:
        raise LitAdapterError(f"{path}: no LoRA tensors in this PEFT LORA file")
    by_stem = {stem: hf for hf, stem in modules.items()}
    for i in range(base.n_layers):
        for name in targets:
            stem = f"layers.{i}.{linear_parent(name)}.{name}"
            for part, letter in (("lora_l1", "A"), ("lora_l2", "B")):
                if f"llama.{stem}.{part}" not in ours:
                    fail(path, f"{PREFIX}{by_stem[stem]}.lora_{letter}.weight", "missing: LoRA on a linear must be "
                                                                                 "on every layer to load")
    config = AdapterConfig(adapter_layers=0, lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
    return AdapterFile(config, ours, path, KIND, origin)


def modules_fused(module: str) -> bool:
    return module.endswith("query_key_value")


# ---- writing (lit-adapter export --format peft) ----


def adaption_prompt_files(prompts: Tensors, config: AdapterConfig, export: ModelConfig, state: Tensors,
                          path: Path) -> Files:
    """Our prompts and gates (what `fold_adapter` left) as ADAPTION_PROMPT files on the LlamaForCausalLM `export`;
    refused where PEFT computes something else (one gate per layer; o_proj and k_proj without extras)."""
    from lit_adapter.adapters.prompt import gate_activation

    if export.qk_norm:
        raise LitAdapterError(f"{path}: PEFT's AdaptionPrompt does not norm the prompt keys per head (qk_norm); "
                              "this model's prompts do: export --format hf after training without prompts")
    if export.head_dim * export.n_heads != export.dim:
        raise LitAdapterError(f"{path}: PEFT's AdaptionPrompt needs head_dim = dim / n_heads "
                              f"({export.head_dim} x {export.n_heads} != {export.dim})")
    layers = sorted({int(key.split(".")[2]) for key in prompts})
    tensors: Tensors = {}
    for i in layers:
        seam = f"llama.layers.{i}.attention.adaption_prompt"
        if f"{seam}.prompt" not in prompts or any(k.startswith(f"{seam}.visual") for k in prompts):
            raise LitAdapterError(f"{path}: layer {i} has no static prompt of its own; PEFT's AdaptionPrompt has "
                                  "static prompts only")
        wo_bias = state.get(f"layers.{i}.attention.wo.bias")
        if wo_bias is not None and bool(wo_bias.ne(0).any()):
            raise LitAdapterError(f"{path}: layer {i}'s wo has a bias, which PEFT's AdaptionPrompt would add a second "
                                  "time (it applies o_proj to the prompt term); export --format litgpt or train "
                                  "without a wo bias")
        gate = gate_activation(config.gate_activation, prompts[f"{seam}.gate"].float())
        if f"{seam}.new_gate" in prompts:
            gate = gate * prompts[f"{seam}.new_gate"].float()
        first = gate.flatten()[:1]
        if not torch.equal(gate.flatten(), first.expand(gate.numel())):
            raise LitAdapterError(f"{path}: key {seam + '.gate'!r}: the heads' gates differ, and PEFT's "
                                  "AdaptionPrompt has one gate per layer; train with gate_shape: layer for an "
                                  "exact export")
        module = f"{PREFIX}model.layers.{i}.self_attn"
        tensors[f"{module}.adaption_prompt"] = prompts[f"{seam}.prompt"].float()[None].contiguous()
        tensors[f"{module}.adaption_gate"] = first.clone()
    if layers != list(range(export.n_layers - len(layers), export.n_layers)):
        raise LitAdapterError(f"{path}: the prompts are on layers {layers}; PEFT's AdaptionPrompt adapts the top "
                              f"layers only")
    data = {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "adapter_len": config.adapter_len,
            "adapter_layers": len(layers), "target_modules": "self_attn", "inference_mode": True}
    return data, tensors


def lora_files(lora: Tensors, config: AdapterConfig, export: ModelConfig, family, path: Path) -> Files:
    """Our LoRA tensors as LORA files on `family`'s modules; q/k lora_B rows in rotate-half order."""
    from lit_adapter.convert.hf import permute

    tensors: Tensors = {}
    targets = set()
    for key, tensor in lora.items():
        stem, part = key.removeprefix("llama.").rsplit(".", 1)
        name = stem.rsplit(".", 1)[-1]
        module = family.hf_key(f"{stem}.weight", export).removesuffix(".weight")
        if modules_fused(module):
            raise LitAdapterError(f"{path}: key {key!r}: LoRA on wq/wk/wv of Falcon has no PEFT form (its q, k and "
                                  "v are one fused query_key_value); train LoRA on wo, w1, w2 only")
        if part == "lora_l2" and name in ("wq", "wk"):
            tensor = permute(tensor, export.n_heads if name == "wq" else export.n_kv_heads)
        tensors[f"{PREFIX}{module}.lora_{'A' if part == 'lora_l1' else 'B'}.weight"] = tensor.contiguous()
        targets.add(module.rsplit(".", 1)[-1])
    data = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.lora_rank,
            "lora_alpha": config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
            "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None}
    return data, tensors


def write(out_dir: Path, files: Files, base_dir: Path) -> None:
    from lit_adapter.checkpoint import save_tensors
    from lit_adapter.files import write_json

    data, tensors = files
    save_tensors(tensors, out_dir / PEFT_WEIGHTS, metadata={"format": "pt"})
    write_json({**data, "base_model_name_or_path": str(base_dir.resolve()), "revision": None}, out_dir / PEFT_CONFIG)
