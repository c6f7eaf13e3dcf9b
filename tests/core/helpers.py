"""Shared helpers of the core tests: the real CLI in a subprocess, synthetic Meta and Hugging Face checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from lit_adapter.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[2]

# Meta's model-parallel layout (reference.md §1): split dim per module; norms are replicated
META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def run_cli(
    *args: str, stdin: Optional[str] = None, env: Optional[dict[str, str]] = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`python -m lit_adapter.cli ARGS` in a fresh process (one thread: the tiny models run faster that way)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lit_adapter.cli", *map(str, args)], input=stdin, capture_output=True, text=True,
        env=env, timeout=timeout,
    )


def assert_cli_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, exactly one line on stderr, no traceback, and the line names every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def random_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Unit-scale random weights (peaked attention, logits of order 1), so layout mistakes show in the logits."""
    from lit_adapter.checkpoint import expected_shapes

    torch.manual_seed(seed)
    return {
        k: (1 + 0.2 * torch.randn(shape)) if len(shape) == 1 else torch.randn(shape) * shape[-1] ** -0.5
        for k, shape in expected_shapes(config).items()
    }


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw a (Hugging Face) model's weights at unit scale, like `random_state_dict`."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0, param.shape[-1] ** -0.5)
    return model


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
