"""Our adapter format: `adapter.safetensors` (the adapter's own tensors) + `adapter_config.yaml` (its config and the
base model it was made for)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from lit_adapter.adapters.config import AdapterConfig
from lit_adapter.adapters.formats.file import AdapterFile, PathLike, Tensors
from lit_adapter.checkpoint import save_tensors
from lit_adapter.config import ModelConfig
from lit_adapter.errors import LitAdapterError, first_line
from lit_adapter.files import load_yaml, save_yaml

if TYPE_CHECKING:
    from lit_adapter.adapters.model import AdapterModel

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.yaml"
FORMAT = "lit-adapter"
KIND = FORMAT

# keys of files written under older names: the file's key (full match) -> our key (a re.Match.expand template)
LEGACY_KEYS: dict[str, str] = {
    # the seam was `Attention.prefix` before it took the papers' name
    r"(.+\.attention)\.prefix\.(prompt|gate|visual_gate|new_gate)": r"\1.adaption_prompt.\2",
}


def save_adapter(model: AdapterModel, out_dir: PathLike) -> Path:
    """Write the adapter's own tensors (`adapter.safetensors`) and config (`adapter_config.yaml`) to out_dir."""
    write_adapter(out_dir, model.adapter_config, model.adapter_state_dict(), model.config)
    return Path(out_dir)


def write_adapter(out_dir: PathLike, config: AdapterConfig, tensors: Tensors, base: ModelConfig) -> None:
    """Write `tensors` (our keys) and `config` as an adapter for `base` (both files written atomically)."""
    out_dir = Path(out_dir)
    save_tensors(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    header = {"format": FORMAT, "base_model": {"name": base.name, "architecture_hash": base.architecture_hash()}}
    save_yaml({**header, **config.to_dict()}, out_dir / ADAPTER_CONFIG)


def read(weights: Path, base: ModelConfig) -> AdapterFile:
    """Read `weights` (an adapter.safetensors) and the adapter_config.yaml beside it, made for `base`."""
    # the weights first: an empty or corrupt file is the problem to report, whatever lies beside it
    if weights.stat().st_size == 0:
        raise LitAdapterError(f"{weights}: empty file (0 bytes), not an adapter; pass the adapter folder or file "
                              "that `lit-adapter fit` wrote")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            stored = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise LitAdapterError(f"{weights}: cannot read safetensors file ({first_line(err)})") from None
    config_path = weights.parent / ADAPTER_CONFIG
    if not config_path.is_file():
        raise LitAdapterError(f"{weights}: no {ADAPTER_CONFIG} beside it; an adapter is the pair {ADAPTER_WEIGHTS} + "
                              f"{ADAPTER_CONFIG} in one folder, as `lit-adapter fit` writes them")
    config = _read_config(config_path, base)
    tensors, origin = _current_names(stored)
    return AdapterFile(config, tensors, weights, KIND, origin)


def _read_config(path: Path, base: ModelConfig) -> AdapterConfig:
    data = load_yaml(path)
    if data.pop("format", None) != FORMAT:
        raise LitAdapterError(f"{path}: not a lit-adapter adapter config (missing `format: {FORMAT}`)")
    made_for = data.pop("base_model", None) or {}
    if made_for.get("architecture_hash") != base.architecture_hash():
        raise LitAdapterError(
            f"{path}: the adapter was made for base model {made_for.get('name')!r} (architecture "
            f"{made_for.get('architecture_hash')}), not {base.name!r} ({base.architecture_hash()}); "
            "load it on the base model it was trained on"
        )
    return AdapterConfig.from_dict(data, source=str(path))


def _current_names(stored: Tensors) -> tuple[Tensors, dict[str, str]]:
    """The tensors under today's keys, and (for the renamed ones) our key -> the file's key."""
    tensors: Tensors = {}
    origin: dict[str, str] = {}
    for key, tensor in stored.items():
        ours = key
        for pattern, target in LEGACY_KEYS.items():
            match = re.fullmatch(pattern, key)
            if match:
                ours = match.expand(target)
                origin[ours] = key
                break
        tensors[ours] = tensor
    return tensors, origin
