"""`lit-adapter export`: a checkpoint (and an adapter) as a Hugging Face, PEFT or LitGPT folder.

- hf: the adapter folded into the base (bias/scale, LoRA, trained norms: `merge.fold_adapter`), its remaining biases
  added to the base's, written as the transformers class of the family (`hf.export_family`). Prompts and visual
  encoders have no place in a plain transformers model: refused.
- peft: bias/scale and norms folded into an exported base (`OUT/base`), the prompts (V1) or LoRA written beside it
  as PEFT's ADAPTION_PROMPT or LORA files (`adapters/formats/peft.py` reads them back).
- litgpt: the base in LitGPT's checkpoint layout and the adapter as `lit_model.pth.adapter` / `.adapter_v2`
  (`convert/litgpt.py`).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Literal, Optional

import torch

from lit_adapter.errors import LitAdapterError

Format = Literal["hf", "peft", "litgpt"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BIAS_KEY = re.compile(r"llama\.(layers\.\d+\.(?:attention|feed_forward)\.w[qkvo123])\.bias")
PEFT_BASE = "base"  # the folder inside OUT_DIR that holds the base the PEFT files sit on


def export(
    checkpoint_dir: Path,
    out_dir: Path,
    adapter: Optional[Path] = None,
    format: Format = "hf",
    adapter_len: Optional[int] = None,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write a model, with its adapter, in another tool's format.

    Args:
        checkpoint_dir: the base model folder (from `lit-adapter convert`).
        out_dir: the folder to write.
        adapter: the adapter (ours, an official LLaMA-Adapter file, a PEFT folder or a LitGPT checkpoint).
        format: hf (a transformers folder of the merged model; no prompts or visual encoder may remain), peft (the
            exported base in OUT_DIR/base and PEFT's ADAPTION_PROMPT or LORA files in OUT_DIR) or litgpt (LitGPT's
            lit_model.pth + model_config.yaml, and lit_model.pth.adapter / .adapter_v2).
        adapter_len: prompt length K of an official V1 file (default 10).
        dtype: the dtype of the written weights; by default the checkpoint's.
        max_shard_size: (hf, peft) the size past which model.safetensors is split into shards with an index.
    """
    from lit_adapter.adapters.formats import check_adapter_tensors, read_adapter
    from lit_adapter.adapters.model import adapter_shapes
    from lit_adapter.checkpoint import load_config, load_weights, tokenizer_path

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise LitAdapterError(f"{out_dir}: the output folder must differ from the checkpoint folder")
    base = load_config(checkpoint_dir)
    adapter_file = read_adapter(adapter, base, adapter_len) if adapter is not None else None
    if adapter_file is not None:
        check_adapter_tensors(adapter_file, adapter_shapes(base, adapter_file.config))
    weights = load_weights(checkpoint_dir, base)
    if dtype is not None:
        weights = {key: tensor.to(DTYPES[dtype]) for key, tensor in weights.items()}
    tokenizer = tokenizer_path(checkpoint_dir)
    if format == "hf":
        export_hf(weights, base, adapter_file, out_dir, tokenizer, max_shard_size)
    elif format == "peft":
        export_peft(weights, base, adapter_file, out_dir, tokenizer, max_shard_size)
    elif format == "litgpt":
        from lit_adapter.convert.litgpt import export_litgpt

        export_litgpt(weights, base, adapter_file, out_dir, tokenizer)
    else:
        raise LitAdapterError(f"--format {format!r}: choose hf, peft or litgpt")
    what = f"{base.name}" + (f" + {adapter_file.path}" if adapter_file is not None else "")
    print(f"exported {what} as {format} -> {out_dir}", file=sys.stderr)
    return out_dir


def export_hf(weights, base, adapter_file, out_dir: Path, tokenizer: Path, max_shard_size: str = "5GB") -> Path:
    """The merged model as a transformers folder; an adapter that keeps prompts or a visual encoder is refused."""
    from lit_adapter.adapters.merge import fold_adapter
    from lit_adapter.convert.hf import export_family, pad_biases, write_hf_folder

    state = weights
    if adapter_file is not None:
        state, remaining, _ = fold_adapter(weights, adapter_file, base)
        left = [key for key in remaining if not BIAS_KEY.fullmatch(key)]
        if left:
            raise LitAdapterError(f"{adapter_file.path}: no plain Hugging Face model holds this adapter: "
                                  f"{describe(left)} remain after folding; export it with --format peft "
                                  "(its prompts as PEFT's ADAPTION_PROMPT) or evaluate it with `lit-adapter eval "
                                  "lm-eval`")
        state = add_biases(state, remaining)
    config = with_state_biases(base, state)
    family, config = export_family(config)
    return write_hf_folder(out_dir, pad_biases(state, config), config, family, tokenizer, max_shard_size)


def describe(keys: list[str]) -> str:
    """What adapter keys are, in words: prompts, gates, a visual encoder, LoRA kept apart, ..."""
    kinds = {}
    for key in keys:
        if key.startswith("visual."):
            kinds.setdefault("a visual encoder (visual.*)", []).append(key)
        elif ".adaption_prompt." in key:
            layer = key.split(".")[2]
            kinds.setdefault("prompts and gates", set()).add(layer)
        elif ".lora_l" in key:
            kinds.setdefault("LoRA that the prompts' keys/values bypass", []).append(key)
        else:
            kinds.setdefault(f"tensors such as {key!r}", []).append(key)
    parts = []
    for kind, found in kinds.items():
        parts.append(f"{kind} of {len(found)} layers" if kind == "prompts and gates" else kind)
    return " and ".join(parts)


def add_biases(state: dict, remaining: dict) -> dict:
    """The adapter's (folded) biases added to the base's own: y = W'x + b0' + b'."""
    out = dict(state)
    for key, bias in remaining.items():
        match = BIAS_KEY.fullmatch(key)
        if match is None:
            continue
        stem = match[1]
        weight = out[f"{stem}.weight"]
        own = out.get(f"{stem}.bias")
        total = bias.double() + (own.double() if own is not None else 0.0)
        out[f"{stem}.bias"] = total.to(weight.dtype)
    return out


def with_state_biases(base, state: dict):
    """`base` with `linear_bias` naming every linear that `state` gives a bias."""
    names = sorted({key.rsplit(".", 2)[-2] for key in state if BIAS_KEY.fullmatch(f"llama.{key}")})
    return dataclasses.replace(base, linear_bias=[n for n in base.linears() if n in names])


# ---- PEFT ----


def export_peft(weights, base, adapter_file, out_dir: Path, tokenizer: Path, max_shard_size: str = "5GB") -> Path:
    """The base with bias/scale and norms folded (OUT/base) and PEFT's files for the prompts or the LoRA."""
    from lit_adapter.adapters.formats import AdapterFile
    from lit_adapter.adapters.formats import peft as peft_format
    from lit_adapter.adapters.merge import fold_adapter
    from lit_adapter.convert.hf import export_family, pad_biases, write_hf_folder

    if adapter_file is None:
        raise LitAdapterError("--format peft needs --adapter: PEFT files hold an adapter (use --format hf for a "
                              "model alone)")
    config = adapter_file.config
    lora = {k: v for k, v in adapter_file.tensors.items() if ".lora_l" in k}
    rest = {k: v for k, v in adapter_file.tensors.items() if ".lora_l" not in k}
    without_lora = AdapterFile(dataclasses.replace(config, lora_rank=0), rest, adapter_file.path, adapter_file.kind,
                               adapter_file.origin)
    state, remaining, _ = fold_adapter(weights, without_lora, base)
    state = add_biases(state, remaining)
    prompts = {k: v for k, v in remaining.items() if ".adaption_prompt." in k}
    other = [k for k in remaining if k not in prompts and not BIAS_KEY.fullmatch(k)]
    if other:
        raise LitAdapterError(f"{adapter_file.path}: PEFT has no tuner for {describe(other)}; only V1 prompts "
                              "(ADAPTION_PROMPT) and LoRA (LORA) export to PEFT")
    if prompts and lora:
        raise LitAdapterError(f"{adapter_file.path}: the adapter has prompts and LoRA; a PEFT adapter folder holds "
                              "one tuner: export the prompts alone (train without LoRA) or --format litgpt / hf")
    if not prompts and not lora:
        raise LitAdapterError(f"{adapter_file.path}: nothing is left for PEFT once bias/scale and norms are folded; "
                              "use --format hf for the merged model")
    state_config = with_state_biases(base, state)
    if prompts:
        family, export_config = export_family(state_config, architecture="LlamaForCausalLM")
        if family.architecture != "LlamaForCausalLM":
            raise LitAdapterError(f"{adapter_file.path}: PEFT's AdaptionPrompt runs on Llama and Mistral models, not "
                                  f"{family.architecture}; export the prompts with --format litgpt, or evaluate them "
                                  "with `lit-adapter eval lm-eval`")
        files = peft_format.adaption_prompt_files(prompts, config, export_config, state, adapter_file.path)
    else:
        family, export_config = export_family(state_config)
        files = peft_format.lora_files(lora, config, export_config, family, adapter_file.path)
    base_dir = write_hf_folder(out_dir / PEFT_BASE, pad_biases(state, export_config), export_config, family,
                               tokenizer, max_shard_size)
    peft_format.write(out_dir, files, base_dir)
    return out_dir
