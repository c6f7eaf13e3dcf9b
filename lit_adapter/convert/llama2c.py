"""llama2.c legacy export (`.bin`): a 7 x int32 header, then float32 weights in a fixed order.

Header: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative = untied classifier), seq_len.
Weights: token embeddings, attention norms, wq, wk, wv, wo, FFN norms, w1, w2, w3, final norm, RoPE tables
(skipped), then the classifier when untied. q/k rows are in Meta's interleaved RoPE layout.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from lit_adapter.config import ModelConfig
from lit_adapter.convert.files import progress
from lit_adapter.errors import LitAdapterError

HEADER = struct.Struct("<7i")


def read_header(path: Path) -> ModelConfig:
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise LitAdapterError(f"{path}: too short for a llama2.c header ({len(raw)} bytes)")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = HEADER.unpack(raw)
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or vocab_size == 0:
        raise LitAdapterError(f"{path}: not a llama2.c legacy export (header {HEADER.unpack(raw)})")
    return ModelConfig(
        name=path.stem, vocab_size=abs(vocab_size), dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv_heads, hidden_dim=hidden_dim, norm_eps=1e-5, max_seq_len=seq_len,
        tie_embeddings=vocab_size > 0,
    )


def load_llama2c(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config = read_header(path)
    c, L, kv_dim = config, config.n_layers, config.n_kv_heads * config.head_dim
    stacked = [
        ("tok_embeddings.weight", None, (c.vocab_size, c.dim)),
        ("attention_norm.weight", L, (c.dim,)),
        ("attention.wq.weight", L, (c.dim, c.dim)),
        ("attention.wk.weight", L, (kv_dim, c.dim)),
        ("attention.wv.weight", L, (kv_dim, c.dim)),
        ("attention.wo.weight", L, (c.dim, c.dim)),
        ("ffn_norm.weight", L, (c.dim,)),
        ("feed_forward.w1.weight", L, (c.hidden_dim, c.dim)),
        ("feed_forward.w2.weight", L, (c.dim, c.hidden_dim)),
        ("feed_forward.w3.weight", L, (c.hidden_dim, c.dim)),
        ("norm.weight", None, (c.dim,)),
        ("rope tables", None, (c.max_seq_len, c.head_dim)),
    ]
    if not c.tie_embeddings:
        stacked.append(("output.weight", None, (c.vocab_size, c.dim)))
    needed = sum((n or 1) * int(np.prod(shape)) for _, n, shape in stacked)
    data = np.memmap(path, dtype="<f4", mode="r", offset=HEADER.size)
    if data.size < needed:
        raise LitAdapterError(
            f"{path}: truncated llama2.c file: {data.size * 4 + HEADER.size} bytes, "
            f"the header promises {needed * 4 + HEADER.size}"
        )
    state: dict[str, torch.Tensor] = {}
    offset = 0
    with progress(len(stacked), path.name, unit="array") as bar:
        for name, n_stack, shape in stacked:
            count = (n_stack or 1) * int(np.prod(shape))
            array = torch.from_numpy(np.array(data[offset: offset + count]))
            offset += count
            bar.update(1)
            if name == "rope tables":
                continue
            if n_stack is None:
                state[name] = array.view(shape)
            else:
                for i, layer in enumerate(array.view(n_stack, *shape)):
                    state[f"layers.{i}.{name}"] = layer.clone()
    return config, state
