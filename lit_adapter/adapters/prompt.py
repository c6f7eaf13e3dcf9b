"""Zero-init attention over adaption prompts: the module attached at `Attention.adaption_prompt` of each adapted layer.

For token queries Q (RoPE applied), each prompt P of the layer adds one separately normalised attention term:

    adaption_prompt(Q) = new_gate * sum_P act(gate_P) * softmax(Q K_P^T / sqrt(d)) V_P,    K_P = wk(P), V_P = wv(P)

Prompt keys get no RoPE and no mask (with `qk_norm`, K_P is normed per head by the layer's k_norm, as its keys
are). With every gate at zero the term is exactly zero, so the adapted model starts as the frozen model. The prompts
of a layer:
- static: K learned tokens (V1, V2); under late fusion the visual tokens are added to them (official V2 code, V1
  multimodal with one global token repeated over the K positions);
- visual: under early fusion (V2 paper), the visual tokens are a prompt of their own, with their own gate.
A row of all-zero visual tokens means "no image" and gets no visual contribution under either fusion.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from lit_adapter import ops
from lit_adapter.adapters.config import AdapterConfig
from lit_adapter.adapters.linear import AdaptedLinear
from lit_adapter.model import Attention, KVCache, LLaMA

PromptKV = dict[str, tuple[torch.Tensor, torch.Tensor]]


def gate_activation(name: str, gate: torch.Tensor) -> torch.Tensor:
    return torch.tanh(gate) if name == "tanh" else gate


class GatedPrompt(nn.Module):
    """The gated prompt term of one attention layer (see the module docstring).

    Parameters (float32, cast to the activation dtype when used): `prompt` [K, dim] (random init, as nn.Embedding),
    `gate` [1, n_heads, 1, 1] (with `gate_shape` layer [1, 1, 1, 1]: one gate for all heads) and `visual_gate`
    [1, n_heads, 1, 1] (zero init), `new_gate` [1, 1, 1, 1] (init 1).
    Prompt keys/values are recomputed on every call, except during generation, where they are kept in the layer's
    `kv_cache.prompt_kv` for the length of that one generation. `fast` (default True) computes each prompt's
    attention with `ops.grouped_attention`; False runs the plain formula of `prompt_attention`.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        adapter_len: int = 10,
        static: bool = True,
        fuse_visual: bool = False,
        visual_prompt: bool = False,
        activation: str = "tanh",
        new_gate: bool = False,
        prompt_kv_lora: bool = True,
        device: Optional[torch.device] = None,
        gate_shape: str = "head",
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.activation = activation
        self.fuse_visual = fuse_visual and static
        self.prompt_kv_lora = prompt_kv_lora
        self.fast = True
        shapes = {
            "prompt": (adapter_len, dim) if static else None,
            "gate": (1, n_heads if gate_shape == "head" else 1, 1, 1) if static else None,
            "visual_gate": (1, n_heads, 1, 1) if visual_prompt else None,
            "new_gate": (1, 1, 1, 1) if new_gate else None,
        }
        for name, shape in shapes.items():
            param = nn.Parameter(torch.empty(shape, device=device, dtype=torch.float32)) if shape else None
            self.register_parameter(name, param)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.prompt is not None:
            nn.init.normal_(self.prompt)  # nn.Embedding's default init: prompts do not start at zero
            nn.init.zeros_(self.gate)
        if self.visual_gate is not None:
            nn.init.zeros_(self.visual_gate)
        if self.new_gate is not None:
            nn.init.ones_(self.new_gate)

    def forward(
        self, attention: Attention, q: torch.Tensor, visual_tokens: Optional[torch.Tensor], kv_cache: Optional[KVCache]
    ) -> torch.Tensor:
        """new_gate * sum_P act(gate_P) * softmax(Q K_P^T / sqrt(d)) V_P, [B, n_heads, T, head_dim], for the
        queries q [B, n_heads, T, head_dim] (RoPE applied) of `attention`."""
        prompt_kv = kv_cache.prompt_kv if kv_cache is not None else None
        if prompt_kv is None:
            prompt_kv = self.keys_values(attention, visual_tokens, q.dtype)
            if kv_cache is not None:
                kv_cache.prompt_kv = prompt_kv  # kept for the rest of this generation
        term = None
        for name, (keys, values) in prompt_kv.items():  # P = the static prompt and/or the visual prompt
            gate = self.gate_of(name, visual_tokens, q.dtype)  # act(gate_P): (1 or B, nh, 1, 1)
            part = prompt_attention(q, keys, values, gate, fast=self.fast)  # (B, nh, T, hs)
            term = part if term is None else term + part
        if term is None:  # e.g. a visual-only layer called without an image
            return torch.zeros_like(q)
        return term if self.new_gate is None else self.new_gate.to(q.dtype) * term

    def gate_of(self, name: str, visual_tokens: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """act(gate_P) [1 or B, n_heads, 1, 1] for prompt `name`; a visual prompt's is 0 on rows without an image."""
        gate = gate_activation(self.activation, self.gate if name == "static" else self.visual_gate).to(dtype)
        if gate.shape[1] != self.n_heads:  # gate_shape layer: one gate, shared by the heads
            gate = gate.expand(-1, self.n_heads, -1, -1)
        if name == "visual" and visual_tokens is not None:
            gate = gate * image_rows(visual_tokens, dtype)
        return gate

    def keys_values(self, attention: Attention, visual_tokens: Optional[torch.Tensor], dtype: torch.dtype) -> PromptKV:
        """Keys and values [B or 1, kv_heads, length, head_dim] of each prompt of this layer."""
        prompt_kv: PromptKV = {}
        visual = visual_tokens.to(dtype) if visual_tokens is not None else None
        if self.prompt is not None:
            tokens = self.prompt.to(dtype)[None]
            if self.fuse_visual and visual is not None:
                tokens = tokens + visual  # [B, K, dim]; one global token [B, 1, dim] is repeated over the K positions
            prompt_kv["static"] = self.project(attention, tokens)
        if self.visual_gate is not None and visual is not None:
            prompt_kv["visual"] = self.project(attention, visual)
        return prompt_kv

    def project(self, attention: Attention, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, _ = tokens.shape
        shape = (batch, length, attention.n_kv_heads, attention.head_dim)
        keys = self.linear(attention.wk, tokens).view(shape).transpose(1, 2)
        values = self.linear(attention.wv, tokens).view(shape).transpose(1, 2)
        if attention.k_norm is not None:  # qk_norm (Qwen3): prompt keys are normed per head like the layer's own
            keys = attention.k_norm(keys)
        return keys, values

    def linear(self, module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        if isinstance(module, AdaptedLinear):
            return module(tokens, lora=self.prompt_kv_lora)
        return module(tokens)


def prompt_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gate: torch.Tensor, fast: bool = True
) -> torch.Tensor:
    """gate * softmax(q K^T / sqrt(d)) V for one prompt: no mask (every query sees every prompt token), no RoPE.

    Args:
        q: [B, n_heads, T, head_dim]; keys, values: [B or 1, kv_heads, K, head_dim]; gate: [B or 1, n_heads, 1, 1].
        fast: through `ops.grouped_attention`, which never repeats the keys per query head and scales the
            probabilities by the gate, so the gate's gradient needs the [T, K] probabilities, not the [T, head_dim]
            output; the plain lines below are the formula it is tested equal to.
    Returns:
        [B, n_heads, T, head_dim].
    """
    if fast:
        return ops.grouped_attention(q, keys, values, weight=gate)
    groups = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)  # (B, nh, K, hs)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, nh, T, K)
    return gate * scores.softmax(dim=-1) @ values


def image_rows(visual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, 1]: 0 for a row whose visual tokens are all zero ("no image", see `AdapterModel.encode_images`),
    else 1. Late fusion needs no mask (adding zero leaves the prompt as it is), but an early-fusion visual prompt of
    zero tokens would still attend to wv's bias."""
    return visual.ne(0).flatten(1).any(dim=1).to(dtype).view(-1, 1, 1, 1)


def attach_prompts(llama: LLaMA, config: AdapterConfig) -> None:
    """Attach a GatedPrompt at `Attention.adaption_prompt` of every layer with a static or an early visual prompt."""
    n = llama.config.n_layers
    static_layers = set(config.static_layers(n))
    visual_layers = set(config.visual_prompt_layers(n))
    device = llama.tok_embeddings.weight.device
    for index, block in enumerate(llama.layers):
        static, visual_prompt = index in static_layers, index in visual_layers
        if not (static or visual_prompt):
            continue
        block.attention.adaption_prompt = GatedPrompt(
            llama.config.dim,
            llama.config.n_heads,
            config.adapter_len,
            static=static,
            fuse_visual=config.visual is not None and config.fusion == "late",
            visual_prompt=visual_prompt,
            activation=config.gate_activation,
            new_gate=config.new_gate,
            prompt_kv_lora=config.prompt_kv_lora,
            device=device,
            gate_shape=config.gate_shape,
        )


def gated_prompts(model: nn.Module) -> dict[str, GatedPrompt]:
    return {name: m for name, m in model.named_modules() if isinstance(m, GatedPrompt)}
