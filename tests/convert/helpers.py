"""Synthetic Meta checkpoints for the converter tests (reference.md §1)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lit_adapter.config import ModelConfig

# Meta's model-parallel layout (reference.md §1): split dim per module; norms are replicated
META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def meta_params(config: ModelConfig, vocab_size: int = -1) -> dict:
    """params.json as Meta writes it (vocab_size -1: read from the embedding)."""
    params = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
              "multiple_of": config.multiple_of, "norm_eps": config.norm_eps, "vocab_size": vocab_size}
    if config.n_kv_heads != config.n_heads:
        params["n_kv_heads"] = config.n_kv_heads
    if config.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = config.ffn_dim_multiplier
    if config.rope_theta != 10000.0:
        params["rope_theta"] = config.rope_theta
    return params


def meta_shards(state_dict: dict[str, torch.Tensor], n_shards: int) -> list[dict[str, torch.Tensor]]:
    """Cut a state dict the way Meta's model-parallel checkpoints are cut (independent copies, not views)."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for key, tensor in state_dict.items():
        dim = META_SPLIT.get(key.split(".")[-2])
        parts = [tensor] * n_shards if dim is None else tensor.chunk(n_shards, dim=dim)
        assert len(parts) == n_shards
        for shard, part in zip(shards, parts, strict=True):
            shard[key] = part.clone()
    return shards


def write_meta_folder(
    folder: Path, state_dict: dict[str, torch.Tensor], params: dict, n_shards: int = 1, rope_freqs: bool = True
) -> Path:
    """A Meta checkpoint folder: params.json + consolidated.NN.pth (with Meta's extra `rope.freqs` buffer)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    head_dim = params["dim"] // params["n_heads"]
    for rank, shard in enumerate(meta_shards(state_dict, n_shards)):
        if rope_freqs:
            shard["rope.freqs"] = torch.rand(head_dim // 2)
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    return folder


def meta_rows_from_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo Hugging Face's q/k row order by explicit indexing: within each head, Meta row 2i is HF row i and
    Meta row 2i+1 is HF row i + head_dim/2 (HF keeps the first halves of all RoPE pairs, then the second halves)."""
    head_dim = weight.shape[0] // n_heads
    index = [h * head_dim + j // 2 + (j % 2) * (head_dim // 2) for h in range(n_heads) for j in range(head_dim)]
    return weight[index]


HF_TO_META = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}


def meta_state_dict_from_hf(hf_state: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> dict:
    """A LlamaForCausalLM state dict in Meta's names and layout, written out independently of lit_adapter."""
    out = {}
    for key, tensor in hf_state.items():
        if key == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = tensor
        elif key == "model.norm.weight":
            out["norm.weight"] = tensor
        elif key == "lm_head.weight":
            out["output.weight"] = tensor
        else:
            _, _, layer, *module, _ = key.split(".")
            name = HF_TO_META[".".join(module)]
            if name == "attention.wq":
                tensor = meta_rows_from_hf(tensor, n_heads)
            elif name == "attention.wk":
                tensor = meta_rows_from_hf(tensor, n_kv_heads)
            out[f"layers.{layer}.{name}.weight"] = tensor
    return out
