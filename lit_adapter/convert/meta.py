"""Meta's consolidated checkpoints: `params.json` + `consolidated.NN.pth`, one shard per model-parallel rank.

Shards split wq/wk/wv/w1/w3/output along dim 0 (output rows), wo/w2/tok_embeddings along dim 1, and replicate the
norms. Merging reads the shards in chunks of keys (see `files`), so memory stays near one copy of the weights.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import torch

from lit_adapter.checkpoint import check_weight_names, expected_shapes
from lit_adapter.config import NAMED_CONFIGS, ModelConfig
from lit_adapter.convert.files import WeightsFile, chunks, read_json_object
from lit_adapter.errors import LitAdapterError

PARAMS_FILE = "params.json"
SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth")
SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
IGNORED_KEYS = {"rope.freqs"}  # precomputed RoPE frequencies; the model computes its own
INT_PARAMS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len")
FLOAT_PARAMS = ("ffn_dim_multiplier", "norm_eps", "rope_theta")


def load_meta(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Meta checkpoint folder into (config, state dict in our key names, which are Meta's)."""
    folder = Path(folder)
    shards = [WeightsFile(path) for path in shard_paths(folder)]
    keys = check_consistent(shards)
    if "tok_embeddings.weight" not in keys:
        raise LitAdapterError(f"{shards[0].path}: missing weight 'tok_embeddings.weight'; is this a LLaMA checkpoint?")
    config = read_params(folder / PARAMS_FILE, vocab_rows=shards[0].shapes["tok_embeddings.weight"][0])
    check_shard_shapes(shards, keys, config)
    return config, merge_shards(shards, keys)


def shard_paths(folder: Path) -> list[Path]:
    numbered = {}
    for path in folder.glob("consolidated.*.pth"):
        match = SHARD_PATTERN.fullmatch(path.name)
        if match:
            numbered[int(match.group(1))] = path
    if not numbered:
        raise LitAdapterError(f"{folder}: no consolidated.NN.pth shards found")
    for rank in range(max(numbered) + 1):
        if rank not in numbered:
            raise LitAdapterError(f"{folder / f'consolidated.{rank:02d}.pth'}: shard missing (found {len(numbered)})")
    return [numbered[rank] for rank in sorted(numbered)]


def split_dim(key: str) -> Optional[int]:
    """The dim along which shards split this weight; None for replicated weights (norms)."""
    parts = key.split(".")
    return SPLIT_DIM.get(parts[-2]) if len(parts) >= 2 else None


def read_params(path: Path, vocab_rows: int) -> ModelConfig:
    """params.json -> ModelConfig; vocab_size -1 means the embedding's row count."""
    params = read_json_object(path, "a Meta checkpoint folder needs its params.json")
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise LitAdapterError(f"{path}: required key {key!r} is missing")
    kwargs: dict[str, Any] = {}
    for key in INT_PARAMS + FLOAT_PARAMS:
        value = params.get(key)
        if value is None:
            continue
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or (key in INT_PARAMS and value != int(value)):
            raise LitAdapterError(f"{path}: {key} must be a number, got {value!r}")
        kwargs[key] = int(value) if key in INT_PARAMS else float(value)
    if kwargs.get("vocab_size", -1) <= 0:
        kwargs["vocab_size"] = vocab_rows
    if params.get("use_scaled_rope"):
        kwargs["rope_scaling"] = scaled_rope(path, params)
    try:
        config = ModelConfig(name=path.parent.name, **kwargs)
    except LitAdapterError as err:
        raise LitAdapterError(f"{path}: {err}") from None
    return with_known_name(config, has_max_seq_len="max_seq_len" in kwargs)


def scaled_rope(path: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Llama 3.1+'s `use_scaled_rope`: the frequency rescaling of Meta's `apply_scaling`, whose constants Meta's
    code fixes (factor 8, bands 1 and 4 over the original 8192 positions) unless params.json names a factor."""
    values = {}
    for key, default in (("rope_scaling_factor", 8.0), ("rope_high_freq_factor", 4.0)):
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 1):
            raise LitAdapterError(f"{path}: {key} must be a number above 1, got {value!r}")
        values[key] = float(value if value is not None else default)
    return {"rope_type": "llama3", "factor": values["rope_scaling_factor"], "low_freq_factor": 1.0,
            "high_freq_factor": values["rope_high_freq_factor"], "original_max_seq_len": 8192}


def with_known_name(config: ModelConfig, has_max_seq_len: bool = True) -> ModelConfig:
    """Name the config after the known model with the same architecture (taking its context length if unknown)."""
    for name, values in NAMED_CONFIGS.items():
        known = ModelConfig(**values)
        if known.architecture_hash() == config.architecture_hash():
            max_seq_len = config.max_seq_len if has_max_seq_len else known.max_seq_len
            return ModelConfig.from_dict({**config.to_dict(), "name": name, "max_seq_len": max_seq_len})
    return config


def check_consistent(shards: list[WeightsFile]) -> list[str]:
    """All shards hold the same keys with the same dtypes; returns the keys to convert, in file order."""
    first = shards[0]
    keys = [k for k in first.keys() if k not in IGNORED_KEYS]
    for shard in shards[1:]:
        for key in keys:
            if key not in shard.shapes:
                raise LitAdapterError(f"{shard.path}: weight {key!r} is missing (it is in {first.path.name})")
            if shard.dtypes[key] != first.dtypes[key]:
                raise LitAdapterError(
                    f"{shard.path}: weight {key!r} is {shard.dtypes[key]}, in {first.path.name} {first.dtypes[key]}"
                )
        extra = [k for k in shard.keys() if k not in first.shapes]
        if extra:
            raise LitAdapterError(f"{shard.path}: weight {extra[0]!r} is not in {first.path.name}")
    return keys


def check_shard_shapes(shards: list[WeightsFile], keys: list[str], config: ModelConfig) -> None:
    """Every shard holds exactly its 1/N slice of every weight the config expects."""
    expected = expected_shapes(config)
    first, n = shards[0], len(shards)
    check_weight_names(expected, keys, str(first.path))
    for key, full in expected.items():
        dim = split_dim(key)
        want = list(full)
        if dim is not None:
            want[dim] = full[dim] // n
        for shard in shards:
            got = list(shard.shapes[key])
            if got != want or (dim is not None and full[dim] % n):
                of = f" (1/{n} of {list(full)})" if dim is not None and n > 1 else ""
                raise LitAdapterError(
                    f"{shard.path}: weight {key!r} has shape {got}, expected {want}{of} for {config.name}"
                )


def merge_shards(shards: list[WeightsFile], keys: list[str]) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    desc = f"{shards[0].path.parent.name} ({len(shards)} shard{'s' * (len(shards) > 1)})"
    for group in chunks(keys, lambda key: sum(shard.nbytes(key) for shard in shards), desc=desc):
        with ExitStack() as stack:
            opened = [stack.enter_context(shard.open()) for shard in shards]
            for key in group:
                merged[key] = merge_tensor(key, [tensors[key] for tensors in opened], shards)
    return merged


def merge_tensor(key: str, parts: list[torch.Tensor], shards: list[WeightsFile]) -> torch.Tensor:
    """One weight from its shard slices, as a fresh tensor (no reference to the mapped files remains)."""
    dim = split_dim(key)
    if dim is not None:
        return torch.cat(parts, dim=dim)
    for part, shard in zip(parts[1:], shards[1:], strict=True):
        if not torch.equal(part, parts[0]):
            raise LitAdapterError(f"{shard.path}: replicated weight {key!r} differs from {shards[0].path.name}")
    return parts[0].clone()

