"""LitGPT's checkpoint layout, for `lit-adapter export --format litgpt` (and `adapters/formats/litgpt.py`, which
reads LitGPT's adapter files with the same tables).

A LitGPT checkpoint folder: `lit_model.pth` (a torch state dict in Hugging Face's rotate-half q/k row order),
`model_config.yaml` (LitGPT's `Config` fields), the tokenizer files. The Llama-style names:
`transformer.wte`, `transformer.h.{i}.norm_1`, `attn.qkv` (q, k and v rows stacked, in that order), `attn.proj`,
`norm_2`, `mlp.fc_1` (our w1), `mlp.fc_2` (w3), `mlp.proj` (w2), `transformer.ln_f`, `lm_head`.

Its adapters: `lit_model.pth.adapter` (V1: `attn.adapter_wte.weight` [K, n_embd] and `attn.gating_factor`
[1, 1, n_head, 1], a raw per-head gate, on the layers from `adapter_start_layer` on; the prompt keys/values come
from `attn.qkv` without RoPE, exactly ours with one KV head only: see `check_prompt_layout`) and
`lit_model.pth.adapter_v2` (also `adapter_bias` / `adapter_scale` of every linear, y = scale * (W x + b0 + bias)
as our `paper` form, on `attn.qkv`, `attn.proj`, the MLP and `lm_head`, and the norm weights), each as
`{"model": state}`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import torch

from lit_adapter.config import ModelConfig
from lit_adapter.errors import LitAdapterError

WEIGHTS = "lit_model.pth"
CONFIG = "model_config.yaml"
V1_FILE = "lit_model.pth.adapter"
V2_FILE = "lit_model.pth.adapter_v2"
TOP = {"tok_embeddings.weight": "transformer.wte.weight", "norm.weight": "transformer.ln_f.weight",
       "output.weight": "lm_head.weight"}
LAYER = {"attention_norm": "norm_1", "ffn_norm": "norm_2", "attention.wo": "attn.proj", "feed_forward.w1": "mlp.fc_1",
         "feed_forward.w3": "mlp.fc_2", "feed_forward.w2": "mlp.proj", "attention.q_norm": "attn.norm_q",
         "attention.k_norm": "attn.norm_k"}
QKV = ("wq", "wk", "wv")
# LitGPT's defaults for the adapter fields of its Config (written to model_config.yaml only where they differ)
DEFAULT_PROMPT_LENGTH, DEFAULT_START_LAYER = 10, 2


def check_representable(config: ModelConfig) -> None:
    """LitGPT's Llama-style model (RMSNorm, LLaMAMLP, sequential residual) is the one written here."""
    if config.norm != "rmsnorm" or config.mlp != "swiglu" or config.parallel_residual:
        raise LitAdapterError(f"{config.name}: --format litgpt writes Llama-style models (RMSNorm, SwiGLU); this one "
                              f"has norm {config.norm!r}, mlp {config.mlp!r}; export --format hf and convert it "
                              "with LitGPT's convert_hf_checkpoint")


def check_prompt_layout(base: ModelConfig, path: Path) -> None:
    """Prompts only where LitGPT computes them as we do: its adapter (0.5) views the prompts' attn.qkv output as
    grouped per KV head (the group's queries, its key, its value) while attn.qkv stacks all queries, then the keys,
    then the values; the two agree with one KV head only."""
    if base.n_kv_heads != 1:
        raise LitAdapterError(f"{path}: LitGPT's adapter takes the prompt keys/values of a model with "
                              f"{base.n_kv_heads} KV heads from other rows of attn.qkv than its keys and values (it "
                              "reads the stacked q|k|v output as grouped per KV head), so prompts have no exact "
                              "LitGPT form here; export V2's bias/scale and norms without prompts, or use --format "
                              "peft / hf")


def litgpt_key(key: str) -> str:
    """LitGPT's name of our weight `key` (wq, wk, wv: the fused `attn.qkv`)."""
    if key in TOP:
        return TOP[key]
    _, index, *module, param = key.split(".")
    module_name = ".".join(module)
    if module_name.rsplit(".", 1)[-1] in QKV:
        return f"transformer.h.{index}.attn.qkv.{param}"
    return f"transformer.h.{index}.{LAYER[module_name]}.{param}"


def fuse(parts: dict[str, torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """wq, wk, wv rows (or their biases / scales) -> LitGPT's qkv: q and k in rotate-half order, then v."""
    from lit_adapter.convert.hf import permute

    return torch.cat([permute(parts["wq"], config.n_heads), permute(parts["wk"], config.n_kv_heads), parts["wv"]])


def split(tensor: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    """LitGPT's qkv rows -> wq, wk, wv in our row order (the inverse of `fuse`)."""
    from lit_adapter.convert.hf import unpermute

    q_rows, kv_rows = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    q, k, v = tensor.split([q_rows, kv_rows, kv_rows])
    return {"wq": unpermute(q, config.n_heads), "wk": unpermute(k, config.n_kv_heads), "wv": v.clone()}


def base_bias(config: ModelConfig) -> tuple[bool, bool, tuple[str, ...]]:
    """(LitGPT's `bias`, its `attn_bias`, the linears that then carry a bias): LitGPT switches a bias on every linear
    (`bias`) or on qkv alone (`attn_bias`); the others of a group are written as zeros."""
    bias = set(config.linear_bias)
    if bias - set(QKV):
        return True, False, config.linears()
    return False, bool(bias), QKV if bias else ()


def litgpt_state(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our base weights in LitGPT's names and layout (the classifier written out when tied: LitGPT has its own)."""
    from lit_adapter.convert.hf import rotate_half_rows

    _, _, with_bias = base_bias(config)
    state: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        name = key.rsplit(".", 2)[-2] if key.startswith("layers.") else None
        if name in QKV:
            fused.setdefault(litgpt_key(key), {})[name] = tensor
        else:
            state[litgpt_key(key)] = rotate_half_rows(key, tensor, config).contiguous()
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = weights["tok_embeddings.weight"].clone()
    for i in range(config.n_layers):
        for name in with_bias:
            key = litgpt_key(f"layers.{i}.{'attention' if name in ('wq', 'wk', 'wv', 'wo') else 'feed_forward'}."
                             f"{name}.bias")
            if name in QKV:
                weight = weights[f"layers.{i}.attention.{name}.weight"]
                fused.setdefault(key, {}).setdefault(name, weight.new_zeros(weight.shape[0]))
            elif key not in state:
                weight = state[key.removesuffix(".bias") + ".weight"]
                state[key] = weight.new_zeros(weight.shape[0])
    for key, parts in fused.items():
        state[key] = fuse(parts, config).contiguous()
    return state


def litgpt_config(config: ModelConfig, prompt_length: Optional[int] = None,
                  start_layer: Optional[int] = None) -> dict[str, Any]:
    """model_config.yaml (LitGPT's Config fields) for `config`; the adapter fields where they differ from LitGPT's
    defaults."""
    bias, attn_bias, _ = base_bias(config)
    data: dict[str, Any] = {
        "name": config.name, "block_size": config.max_seq_len, "vocab_size": config.vocab_size,
        "padded_vocab_size": config.vocab_size, "padding_multiple": 1, "n_layer": config.n_layers,
        "n_head": config.n_heads, "n_embd": config.dim, "head_size": config.head_dim,
        "n_query_groups": config.n_kv_heads, "rotary_percentage": 1.0, "parallel_residual": False, "bias": bias,
        "attn_bias": attn_bias, "lm_head_bias": False, "norm_class_name": "RMSNorm", "norm_eps": config.norm_eps,
        "mlp_class_name": "LLaMAMLP", "intermediate_size": config.hidden_dim, "rope_base": config.rope_theta,
        "norm_qk": config.qk_norm,
    }
    if config.rope_scaling is not None:
        data["rope_adjustments"] = {k: v for k, v in config.rope_scaling.items() if k != "rope_type"}
    if prompt_length is not None and prompt_length != DEFAULT_PROMPT_LENGTH:
        data["adapter_prompt_length"] = prompt_length
    if start_layer is not None and start_layer != DEFAULT_START_LAYER:
        data["adapter_start_layer"] = start_layer
    return data


def adapter_state(adapter_file, base: ModelConfig, weights: dict[str, torch.Tensor]) -> tuple[str, dict, int, int]:
    """(file name, LitGPT adapter state, prompt length, adapter_start_layer) of our adapter; what LitGPT's adapters
    cannot compute is refused in one line."""
    from lit_adapter.adapters.prompt import gate_activation

    config, tensors, path = adapter_file.config, adapter_file.tensors, adapter_file.path
    refuse = {
        "a visual encoder": config.visual is not None, "LoRA (LitGPT keeps LoRA in its own lora checkpoints)":
            config.lora_rank > 0, "bias_mode official_65b (a scale on the input side)":
            config.bias_mode == "official_65b",
        "an adapter on per-head q/k norms (qk_norm: LitGPT's prompt keys skip them, its V2 does not train them)":
            base.qk_norm,
    }
    found = [what for what, present in refuse.items() if present]
    if found:
        raise LitAdapterError(f"{path}: LitGPT's adapter / adapter_v2 cannot represent {found[0]}; export it with "
                              "--format hf or --format peft")
    layers = list(config.static_layers(base.n_layers))
    if layers:
        check_prompt_layout(base, path)
    start = layers[0] if layers else base.n_layers
    state: dict[str, torch.Tensor] = {}
    for i in layers:
        seam = f"llama.layers.{i}.attention.adaption_prompt"
        gate = gate_activation(config.gate_activation, tensors[f"{seam}.gate"].float())
        if f"{seam}.new_gate" in tensors:
            gate = gate * tensors[f"{seam}.new_gate"].float()
        state[f"transformer.h.{i}.attn.adapter_wte.weight"] = tensors[f"{seam}.prompt"].float().contiguous()
        state[f"transformer.h.{i}.attn.gating_factor"] = gate.expand(1, base.n_heads, 1, 1).permute(
            0, 2, 1, 3).contiguous()
    v2 = config.bias_mode != "none" or config.train_norms
    if not v2:
        return V1_FILE, state, config.adapter_len, start
    state.update(v2_linears(tensors, base))
    for key, tensor in weights.items():  # every norm is in a V2 file: trained (the adapter's) or as the base has it
        if key.endswith(("norm.weight", "norm.bias")) and ".q_norm" not in key and ".k_norm" not in key:
            state[litgpt_key(key)] = tensors.get(f"llama.{key}", tensor).float().contiguous()
    return V2_FILE, state, config.adapter_len, start


def v2_linears(tensors: dict[str, torch.Tensor], base: ModelConfig) -> dict[str, torch.Tensor]:
    """adapter_bias / adapter_scale of every LitGPT linear (zeros and ones where ours has none; lm_head's too)."""
    from lit_adapter.adapters.linear import linear_parent

    out: dict[str, torch.Tensor] = {}
    rows = {"wq": base.n_heads * base.head_dim, "wk": base.n_kv_heads * base.head_dim,
            "wv": base.n_kv_heads * base.head_dim, "wo": base.dim, "w1": base.hidden_dim, "w3": base.hidden_dim,
            "w2": base.dim}
    for i in range(base.n_layers):
        fused: dict[str, dict[str, torch.Tensor]] = {"adapter_bias": {}, "adapter_scale": {}}
        for name in base.linears():
            stem = f"layers.{i}.{linear_parent(name)}.{name}"
            bias = tensors.get(f"llama.{stem}.bias")
            scale = tensors.get(f"llama.{stem}.scale")
            values = {"adapter_bias": bias.float() if bias is not None else torch.zeros(rows[name]),
                      "adapter_scale": scale.float() if scale is not None else torch.ones(rows[name])}
            for part, value in values.items():
                if name in QKV:
                    fused[part][name] = value
                else:
                    out[litgpt_key(f"{stem}.weight").removesuffix("weight") + part] = value.contiguous()
        for part, parts in fused.items():
            out[f"transformer.h.{i}.attn.qkv.{part}"] = fuse(parts, base).contiguous()
    out["lm_head.adapter_bias"] = torch.zeros(base.vocab_size)
    out["lm_head.adapter_scale"] = torch.ones(base.vocab_size)
    return out


def export_litgpt(weights: dict[str, torch.Tensor], base: ModelConfig, adapter_file, out_dir: Path,
                  tokenizer: Path) -> Path:
    """The base in LitGPT's layout (+ the adapter as lit_model.pth.adapter / .adapter_v2) in one folder, which
    `litgpt generate_adapter OUT --adapter_path OUT/lit_model.pth.adapter` (or `_v2`) runs."""
    from lit_adapter.files import atomic_path, save_yaml
    from lit_adapter.tokenizer import copy_tokenizer

    check_representable(base)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    length = start = None
    if adapter_file is not None:
        name, state, length, start = adapter_state(adapter_file, base, weights)
        for stale in (V1_FILE, V2_FILE):
            (out_dir / stale).unlink(missing_ok=True)
        with atomic_path(out_dir / name) as tmp:
            torch.save({"model": state}, tmp)
    with atomic_path(out_dir / WEIGHTS) as tmp:
        torch.save(litgpt_state(weights, base), tmp)
    save_yaml(litgpt_config(base, length, start), out_dir / CONFIG)
    copy_tokenizer(tokenizer, out_dir)
    if adapter_file is not None:
        print(f"run it with `litgpt generate_adapter{'_v2' if name == V2_FILE else ''} {out_dir} --adapter_path "
              f"{out_dir / name}`", file=sys.stderr)
    return out_dir
