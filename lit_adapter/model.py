"""The plain LLaMA, in one file: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, KV cache.

References: LLaMA (Touvron et al., 2023, arXiv:2302.13971) and Meta's `llama/model.py`. Module names follow Meta's
checkpoints (`layers.{i}.attention.wq`, `feed_forward.w1`, ...), so Meta and official LLaMA-Adapter state dicts map
onto this model key for key. Fast kernels (the attention paths, SwiGLU's memory-saving backward) are in `ops.py`.

The other decoder families are the same model with a few `ModelConfig` fields, each read on the line where it acts:
Llama 3 (`rope_scaling`, Llama 3.1, arXiv:2407.21783), Mistral (as LLaMA), Qwen2 (`linear_bias` on wq/wk/wv),
Qwen3 (`qk_norm`), Falcon (`norm` layernorm, `mlp` gelu, `parallel_residual`, `shared_norm`; Almazrouei et al.,
2023, arXiv:2311.16867).

Adapters never copy this file. Attention has one seam, `Attention.adaption_prompt`: when an adapter module is
attached there, its gated prompt term (LLaMA-Adapter's zero-init attention over adaption prompts) is added to the
attention output:

    O = softmax(Q K_t^T / sqrt(d) + causal) V_t  +  adaption_prompt(Q)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter import ops
from lit_adapter.config import ModelConfig


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight.to(x.dtype)  # a trained float32 weight keeps a bf16 stream in bf16

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class LayerNorm(nn.Module):
    """(x - mean(x)) / sqrt(var(x) + eps) * weight + bias over the last axis, computed in float32 (Falcon)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), weight.shape, weight, bias, self.eps).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}  # ModelConfig.norm -> its module


def build_rope(
    seq_len: int,
    head_dim: int,
    theta: float,
    device: Optional[torch.device] = None,
    scaling: Optional[dict] = None,
) -> torch.Tensor:
    """Rotations e^(i p theta^(-2j / head_dim)) as a complex64 table [seq_len, head_dim // 2] (Meta's freqs_cis);
    with `scaling` (ModelConfig.rope_scaling), the frequencies first rescaled as Llama 3.1 does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's RoPE scaling by wavelength band, for a context `factor` times the original one.

    Short wavelengths (under original_max_seq_len / high_freq_factor) are kept, long ones (over original_max_seq_len
    / low_freq_factor) are divided by `factor`, and the band between blends the two linearly in
    original_max_seq_len / wavelength.
    """
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_seq_len"]
    wavelength = 2 * math.pi / inv_freq
    smooth = ((context / wavelength - low) / (high - low)).clamp(0, 1)  # 0: long wavelengths, 1: short ones
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs of x [B, heads, T, head_dim] as complex numbers: (x[2i] + i x[2i+1]) * rotation,
    with rotation [(B,) T, head_dim // 2] from `build_rope`. The result is a new contiguous tensor."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation.unsqueeze(-3)).flatten(-2).type_as(x)


class KVCache:
    """Keys and values of past positions for one layer, [B, kv_heads, max_len, head_dim], for generation only.

    `prompt_kv` is a slot where an adapter may keep its prompt keys/values for the length of one generation.
    """

    def __init__(self, batch_size: int, kv_heads: int, max_len: int, head_dim: int, device, dtype) -> None:
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.prompt_kv: Optional[object] = None

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int) -> tuple[torch.Tensor, ...]:
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Grouped-query attention with RoPE on queries and keys; n_kv_heads = n_heads is multi-head attention,
    n_kv_heads = 1 multi-query attention (Falcon-7B)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        bias = config.linear_bias
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias="wq" in bias)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias="wk" in bias)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias="wv" in bias)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias="wo" in bias)
        # Qwen3: an RMSNorm over each head of q and of k (weights [head_dim], shared by the heads)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        # The adapter seam: a module called as adaption_prompt(attention, q, visual_tokens, kv_cache), which returns
        # [B, n_heads, T, head_dim].
        self.adaption_prompt: Optional[nn.Module] = None

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        input_pos: Optional[torch.Tensor] = None,
        visual_tokens: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # per head, before RoPE (Qwen3)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv_cache is not None:
            k, v = kv_cache.update(input_pos, k, v, end=mask.shape[-1])  # (B, n_kv, S, hs): the positions so far
        y = ops.attention(q, k, v, mask)  # softmax(q k^T / sqrt(hs) + mask) v: (B, nh, T, hs)
        if self.adaption_prompt is not None:
            y = y + self.adaption_prompt(self, q, visual_tokens, kv_cache)  # the adapter's gated prompt term
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, dim)


class FeedForward(nn.Module):
    """SwiGLU w2(silu(w1 x) * w3 x) (`mlp: swiglu`), or the GELU MLP w2(gelu(w1 x)) of Falcon (`mlp: gelu`, no w3)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        bias = config.linear_bias
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias="w1" in bias)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias="w2" in bias)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias="w3" in bias) if config.mlp == "swiglu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            return self.w2(F.gelu(self.w1(x)))  # (B, T, dim), exact (erf) GELU
        return self.w2(ops.silu_mul(self.w1(x), self.w3(x)))  # (B, T, dim)


class Block(nn.Module):
    """Pre-norm residual block: h = x + attention(norm(x)), out = h + feed_forward(norm(h)).

    With `parallel_residual` (Falcon) attention and MLP both read x: out = x + attention(norm(x)) + feed_forward(
    norm'(x)), where norm' is `ffn_norm`, or with `shared_norm` the attention's own norm (Falcon-7B has one norm).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.attention_norm = NORMS[config.norm](config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = None if config.shared_norm else NORMS[config.norm](config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, **attention_kwargs) -> torch.Tensor:
        normed = self.attention_norm(x)
        attention = self.attention(normed, rope, **attention_kwargs)
        if self.parallel_residual:
            mlp_input = normed if self.ffn_norm is None else self.ffn_norm(x)
            return x + (self.feed_forward(mlp_input) + attention)
        h = x + attention
        return h + self.feed_forward(self.ffn_norm(h))


class LLaMA(nn.Module):
    """The decoder of every family: token embedding, `n_layers` blocks, final norm, classifier (the embedding's own
    weight with `tie_embeddings`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = NORMS[config.norm](config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.kv_caches: Optional[list[KVCache]] = None
        self._rope: Optional[torch.Tensor] = None

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
        visual_tokens: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        last_only: bool = False,
        hidden_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for tokens idx [B, T].

        Without a KV cache the sequence starts at position 0 and attention is causal. With one (see
        `set_kv_cache`), `input_pos` [T] gives the positions of idx and the keys seen are positions 0..max(input_pos).
        `mask` (boolean [B, 1, T, S], True = attend) overrides the default causal mask, e.g. for left padding.
        `visual_tokens` (an adapter's encoded images) are handed to every attached adaption prompt.
        `positions` ([B, T], default input_pos) are the rotary positions of each row when they differ from the cache
        slots `input_pos`, e.g. in a left-padded batch where row b's first real token sits in slot pad_b.
        `last_only` returns the logits of the last position alone ([B, 1, vocab]): all that decoding needs, and the
        classifier is the largest matmul of a prefill.
        `hidden_only` returns the final normed hidden states [B, T, dim] instead of logits: the training loss applies
        the classifier itself, to the supervised positions only (`lit_adapter.training.loss.head_cross_entropy`).
        """
        T = idx.shape[1]
        if input_pos is None:
            input_pos = torch.arange(T, device=idx.device)
        rotations = self.rope(int(input_pos.max()) + 1 if self.kv_caches is not None else T, idx.device)
        rope = rotations[input_pos if positions is None else positions]
        if self.kv_caches is not None and mask is None:
            mask = causal_mask(input_pos, int(input_pos.max()) + 1)
        x = self.tok_embeddings(idx)  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            cache = self.kv_caches[i] if self.kv_caches is not None else None
            x = layer(x, rope, mask=mask, kv_cache=cache, input_pos=input_pos, visual_tokens=visual_tokens)
        if last_only:
            x = x[:, -1:]  # (B, 1, dim): decoding reads the last position only
        x = self.norm(x)
        return x if hidden_only else self.output(x)  # (B, T, vocab)

    def rope(self, seq_len: int, device: torch.device) -> torch.Tensor:
        if self._rope is None or self._rope.shape[0] < seq_len or self._rope.device != device:
            length, c = max(seq_len, self.config.max_seq_len), self.config
            self._rope = build_rope(length, c.head_dim, c.rope_theta, device, scaling=c.rope_scaling)
        return self._rope

    def set_kv_cache(self, batch_size: int, max_len: Optional[int] = None, device=None, dtype=None) -> None:
        param = self.output.weight
        max_len = max_len or self.config.max_seq_len
        c = self.config
        self.kv_caches = [
            KVCache(batch_size, c.n_kv_heads, max_len, c.head_dim, device or param.device, dtype or param.dtype)
            for _ in range(c.n_layers)
        ]

    def clear_kv_cache(self) -> None:
        self.kv_caches = None

    def reset_parameters(self) -> None:
        """Random init for training from scratch or benchmarking (N(0, 0.02) linears/embedding, zero biases, unit
        norms)."""
        if self.config.tie_embeddings:  # `to_empty` on a meta-device model gives each module its own parameter
            self.output.weight = self.tok_embeddings.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:  # Qwen2's q/k/v, Falcon's linears with bias: true
                    nn.init.zeros_(module.bias)
            elif isinstance(module, tuple(NORMS.values())):
                module.reset_parameters()


def causal_mask(input_pos: torch.Tensor, key_len: int) -> torch.Tensor:
    """Boolean [1, 1, T, key_len]: query at position p attends to keys 0..p."""
    keys = torch.arange(key_len, device=input_pos.device)
    return (keys[None, :] <= input_pos[:, None])[None, None]
