"""An independent plain-torch LLaMA-Adapter forward, written from the papers' and the official code's formulas.

It reads raw tensors only (Meta key names for the base, a small description of the adapter) and shares no code with
lit_adapter: complex-number RoPE as in Meta's code, explicit matmul + float32 softmax attention, explicit repeat of
grouped key/value heads, and the prompt term as a second, separate softmax scaled by the gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from lit_adapter.config import ModelConfig

Linear = Callable[[int, str, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer, name, x, base weight) -> y


def plain_linear(layer: int, name: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x @ weight.T


@dataclass
class Adapter:
    """What the reference needs to know about an adapter, in the papers' terms."""

    prompts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> static prompt [K, dim]
    gates: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [1, H, 1, 1]
    activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh
    late_visual: Optional[torch.Tensor] = None  # [B, K or 1, dim], added to every static prompt
    early_visual: Optional[torch.Tensor] = None  # [B, V, dim], its own prompt in `early_gates`' layers
    early_gates: dict[int, torch.Tensor] = field(default_factory=dict)
    new_gates: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [1, 1, 1, 1]
    linear: Linear = plain_linear  # the adapted linear layers (bias/scale/LoRA)
    prompt_linear: Optional[Linear] = None  # for prompt keys/values; None = `linear`
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # Meta norm key -> trained weight


def up(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, so the reference can run in double precision)."""
    return x if x.dtype == torch.float64 else x.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = up(x)
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_complex(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's rotary embedding: pairs (x[2i], x[2i+1]) as complex numbers times e^{i t theta^(-2i/d)}."""
    _, seq, _, dim = x.shape
    x = up(x)
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].to(x.dtype) / dim))
    angles = torch.outer(torch.arange(seq).to(x.dtype), freqs)
    cis = torch.polar(torch.ones_like(angles), angles)
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)


def heads(x: torch.Tensor, n: int, repeat: int) -> torch.Tensor:
    """[B, T, n*d] -> [B, n*repeat, T, d], each key/value head repeated for the query heads that share it."""
    b, t, _ = x.shape
    return x.view(b, t, n, -1).repeat_interleave(repeat, dim=2).transpose(1, 2)


def prompt_attention(q, tokens, layer, wk, wv, config, adapter: Adapter) -> torch.Tensor:
    """softmax(q K_p^T / sqrt(d)) V_p with K_p = wk(P), V_p = wv(P): no RoPE, no mask."""
    project = adapter.prompt_linear or adapter.linear
    repeat = config.n_heads // config.n_kv_heads
    keys = heads(project(layer, "wk", tokens, wk), config.n_kv_heads, repeat)
    values = heads(project(layer, "wv", tokens, wv), config.n_kv_heads, repeat)
    if keys.shape[0] != q.shape[0]:
        keys, values = keys.expand(q.shape[0], -1, -1, -1), values.expand(q.shape[0], -1, -1, -1)
    scores = q @ keys.transpose(2, 3) / math.sqrt(q.shape[-1])
    return torch.softmax(up(scores), dim=-1) @ values


def prompt_term(q, layer, wk, wv, config: ModelConfig, adapter: Adapter) -> Optional[torch.Tensor]:
    """new_gate * (act(gate) * static prompt attention + act(visual gate) * early visual prompt attention)."""
    term = None
    if layer in adapter.prompts:
        tokens = adapter.prompts[layer][None]
        if adapter.late_visual is not None:
            tokens = tokens + adapter.late_visual
        term = adapter.activation(adapter.gates[layer]) * prompt_attention(q, tokens, layer, wk, wv, config, adapter)
    if layer in adapter.early_gates and adapter.early_visual is not None:
        visual = adapter.activation(adapter.early_gates[layer]) * prompt_attention(
            q, adapter.early_visual, layer, wk, wv, config, adapter)
        term = visual if term is None else term + visual
    if term is not None and layer in adapter.new_gates:
        term = adapter.new_gates[layer] * term
    return term


def reference_logits(weights: dict, config: ModelConfig, ids: torch.Tensor, adapter: Adapter) -> torch.Tensor:
    """Logits [B, T, vocab] of the frozen model `weights` (Meta names) with `adapter` applied."""
    def norm(key: str) -> torch.Tensor:
        return adapter.norms.get(key, weights[key])

    lin, eps, repeat = adapter.linear, config.norm_eps, config.n_heads // config.n_kv_heads
    h = weights["tok_embeddings.weight"][ids]
    batch, seq = ids.shape
    causal = torch.full((seq, seq), float("-inf")).triu(1)
    for i in range(config.n_layers):
        p = f"layers.{i}."
        w = {n: weights[f"{p}attention.{n}.weight"] for n in ("wq", "wk", "wv", "wo")}
        w |= {n: weights[f"{p}feed_forward.{n}.weight"] for n in ("w1", "w2", "w3")}
        x = rms_norm(h, norm(f"{p}attention_norm.weight"), eps)
        q = rope_complex(lin(i, "wq", x, w["wq"]).view(batch, seq, config.n_heads, -1), config.rope_theta)
        k = rope_complex(lin(i, "wk", x, w["wk"]).view(batch, seq, config.n_kv_heads, -1), config.rope_theta)
        v = lin(i, "wv", x, w["wv"]).view(batch, seq, config.n_kv_heads, -1)
        q = q.transpose(1, 2)
        k = k.repeat_interleave(repeat, dim=2).transpose(1, 2)
        v = v.repeat_interleave(repeat, dim=2).transpose(1, 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(config.head_dim) + causal
        out = torch.softmax(up(scores), dim=-1) @ v
        term = prompt_term(q, i, w["wk"], w["wv"], config, adapter)
        if term is not None:
            out = out + term
        h = h + lin(i, "wo", out.transpose(1, 2).reshape(batch, seq, -1), w["wo"])
        x = rms_norm(h, norm(f"{p}ffn_norm.weight"), eps)
        h = h + lin(i, "w2", torch.nn.functional.silu(lin(i, "w1", x, w["w1"])) * lin(i, "w3", x, w["w3"]), w["w2"])
    output = weights.get("output.weight", weights["tok_embeddings.weight"])
    return rms_norm(h, norm("norm.weight"), eps) @ output.T
