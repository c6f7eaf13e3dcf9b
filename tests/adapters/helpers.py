"""Shared pieces of the adapter tests: tiny visual configs, adapter modes, random adapter values, the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_adapter.adapters import AdapterConfig, AdapterModel
from tests.adapters.reference import Adapter
from tests.helpers import tiny_visual  # noqa: F401  (the adapter tests' visual config)

DIM, LAYERS, HEADS, KV_DIM, HIDDEN = 64, 5, 8, 32, 172  # stories260K
ATTENTION = {"wq": (DIM, DIM), "wk": (KV_DIM, DIM), "wv": (KV_DIM, DIM), "wo": (DIM, DIM)}  # [out, in]
FFN = {"w1": (HIDDEN, DIM), "w2": (DIM, HIDDEN), "w3": (HIDDEN, DIM)}
GENERATOR = torch.Generator().manual_seed(0)

IDS = torch.tensor([[1, 403, 261, 336, 271, 259, 500, 400, 7], [1, 18, 77, 123, 321, 45, 99, 256, 3]])


def official_clip_encode_image(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LLaMA-Adapter V2's `clip_encode_image`: every token through ln_post and the visual projection."""
    x = visual.conv1(x).flatten(2).permute(0, 2, 1)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    for block in visual.transformer.resblocks:
        x = block(x)
    return visual.ln_post(x) @ visual.proj


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# every mode the framework offers, on stories260K (5 layers)
MODES: dict[str, AdapterConfig] = {
    "v1": AdapterConfig.v1(adapter_layers=3, adapter_len=4),
    "v1-identity-gate": AdapterConfig.v1(adapter_layers=5, adapter_len=2, gate_activation="identity"),
    "v2-paper": AdapterConfig.v2(adapter_len=4),
    "v2-official_7b": AdapterConfig.v2(adapter_len=4, bias_mode="official_7b"),
    "v2-official_65b": AdapterConfig.v2(adapter_len=4, bias_mode="official_65b"),
    "v2-bias": AdapterConfig.v2(adapter_len=4, bias_mode="bias"),
    "v2-lora": AdapterConfig.v2(adapter_len=4, bias_mode="official_7b", lora_rank=3, new_gate=True),
    "v2-lora-alpha-no-prompt-lora": AdapterConfig.v2(adapter_len=4, lora_rank=2, lora_alpha=6.0, prompt_kv_lora=False,
                                                     lora_targets=["wq", "wk", "wv", "w2"]),
    "v2-early": AdapterConfig.v2(adapter_len=4, visual=tiny_visual(), visual_layers=2),
    "v2-early-overlap-newgate": AdapterConfig.v2(adapter_len=4, adapter_layers=5, visual=tiny_visual(), visual_layers=2,
                                                 new_gate=True),
    "v2-late": AdapterConfig.v2(adapter_len=3, visual=tiny_visual(), fusion="late"),
    "v1-global": AdapterConfig.v1(adapter_layers=3, adapter_len=4, visual=tiny_visual(mode="global")),
}


def randomize(model: AdapterModel, seed: int = 0, scale: float = 0.3) -> None:
    """Move every adapter value away from its init: gates, new gates, biases, scales, LoRA, norms, prompts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.adapter_parameters().items():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if name.endswith("gate"):
                param.copy_(noise)
            else:
                param.add_(scale * noise)


def adapter_params(model: AdapterModel, layer: int, name: str) -> dict[str, torch.Tensor]:
    parent = "attention" if name in ("wq", "wk", "wv", "wo") else "feed_forward"
    module = getattr(getattr(model.llama.layers[layer], parent), name)
    found = {p: getattr(module, p, None) for p in ("bias", "scale", "lora_l1", "lora_l2")}
    return {p: v.detach() for p, v in found.items() if v is not None}


def explicit_linear(model: AdapterModel, with_lora: bool = True):
    """The bias/scale/LoRA forms written out (reference.md §3), reading the model's adapter values."""
    config = model.adapter_config
    scaling = 1.0 if config.lora_alpha is None else config.lora_alpha / config.lora_rank

    def linear(layer: int, name: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        p = {k: v.to(x.dtype) for k, v in adapter_params(model, layer, name).items()}
        if "scale" in p and config.bias_mode == "paper":
            y = p["scale"] * (x @ weight.T + p["bias"])  # y = s * (Wx + b)
        elif "scale" in p and config.bias_mode == "official_65b":
            y = (x * p["scale"]) @ weight.T + p["bias"]  # y = W (s * x) + b
        elif "bias" in p:
            y = x @ weight.T + p["bias"]  # y = Wx + b
        else:
            y = x @ weight.T
        if with_lora and "lora_l1" in p:
            y = y + scaling * ((x @ p["lora_l1"].T) @ p["lora_l2"].T)
        return y

    return linear


def reference_adapter(model: AdapterModel, visual_tokens: torch.Tensor | None) -> Adapter:
    """The reference's view of `model`'s adapter, values read from the model, formulas written in the test."""
    config = model.adapter_config
    dtype = model.llama.tok_embeddings.weight.dtype
    adapter = Adapter(
        activation=torch.tanh if config.gate_activation == "tanh" else (lambda g: g),
        linear=explicit_linear(model),
        prompt_linear=None if config.prompt_kv_lora else explicit_linear(model, with_lora=False),
    )
    for i, block in enumerate(model.llama.layers):
        prompt = block.attention.adaption_prompt
        if prompt is None:
            continue
        if prompt.prompt is not None:
            adapter.prompts[i], adapter.gates[i] = prompt.prompt.detach().to(dtype), prompt.gate.detach().to(dtype)
        if prompt.visual_gate is not None:
            adapter.early_gates[i] = prompt.visual_gate.detach().to(dtype)
        if prompt.new_gate is not None:
            adapter.new_gates[i] = prompt.new_gate.detach().to(dtype)
    if visual_tokens is not None:
        if config.fusion == "late":
            adapter.late_visual = visual_tokens
        else:
            adapter.early_visual = visual_tokens
    if config.train_norms:
        adapter.norms = {k.removeprefix("llama."): v.detach() for k, v in model.named_parameters()
                         if k.endswith("norm.weight")}
    return adapter


def rand(*shape, scale: float = 0.2) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=GENERATOR)


def one_line_error(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


def official_v1(gate_shape=(1, HEADS, 1, 1)) -> dict[str, torch.Tensor]:
    """The released V1 layout at stories260K size: adapter_query for L=3 layers x K=4 tokens, a gate per layer."""
    state = {"adapter_query.weight": rand(3 * 4, DIM, scale=1.0)}
    state |= {f"layers.{i}.attention.gate": rand(*gate_shape, scale=1.0) for i in range(LAYERS)}
    return state
