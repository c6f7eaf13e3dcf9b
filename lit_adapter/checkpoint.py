"""The checkpoint folder every command reads: `model.safetensors`, `model_config.yaml`, the tokenizer (`tokenizer.model`
or `tokenizer.json`, with the Hugging Face files beside it)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from lit_adapter.config import ModelConfig, check_model_config_fields
from lit_adapter.errors import LitAdapterError
from lit_adapter.files import atomic_path, load_yaml, save_yaml  # noqa: F401  (the checkpoint folder's YAML files)
from lit_adapter.model import LLaMA
from lit_adapter.tokenizer import copy_tokenizer, find_tokenizer_file

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.yaml"
TOKENIZER_FILE = "tokenizer.model"

PathLike = Union[str, Path]


def save_tensors(tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Optional[dict] = None) -> None:
    """Atomic safetensors write; tied or non-contiguous tensors are stored as independent contiguous copies."""
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        key = tensor.data_ptr()
        out[name] = tensor.clone().contiguous() if key in seen or not tensor.is_contiguous() else tensor
        seen.setdefault(key, name)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=metadata)


def save_checkpoint(
    out_dir: PathLike, state_dict: Mapping[str, torch.Tensor], config: ModelConfig, tokenizer: Optional[PathLike]
) -> Path:
    """Write a checkpoint folder. The tied classifier (`output.weight`) is not stored when embeddings are tied."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v for k, v in state_dict.items() if not (config.tie_embeddings and k == "output.weight")}
    check_state_dict(tensors, config, source=str(out_dir))
    save_tensors(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    save_yaml(config.to_dict(), out_dir / CONFIG_FILE)
    if tokenizer is not None:  # tokenizer.model or tokenizer.json, with the Hugging Face files beside it
        copy_tokenizer(tokenizer, out_dir)
    return out_dir


class _SkipInit(TorchFunctionMode):
    """Turns `torch.nn.init` calls into no-ops: on the meta device, `normal_` alone would import torch._dynamo
    (seconds per process) to initialise weights that are about to be replaced anyway."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs.get("tensor")
        return func(*args, **(kwargs or {}))


def meta_model(config: ModelConfig) -> LLaMA:
    """The model's structure on the meta device, without random init: weights must be assigned before use."""
    with torch.device("meta"), _SkipInit():
        return LLaMA(config)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of a LLaMA with this config and its shape (the tied classifier left out)."""
    model = meta_model(config)
    tied = {"output.weight"} if config.tie_embeddings else set()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def check_weight_names(expected: Mapping[str, object], names: Iterable[str], source: str) -> None:
    """Fail with one line naming the first missing or unexpected weight name."""
    names = list(names)
    missing = [k for k in expected if k not in set(names)]
    if missing:
        raise LitAdapterError(f"{source}: missing weight {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = [k for k in names if k not in expected]
    if unexpected:
        raise LitAdapterError(f"{source}: unexpected weight {unexpected[0]!r} ({len(unexpected)} unexpected in all)")


def check_state_dict(state_dict: Mapping[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """Fail with one line naming the first missing, unexpected or wrongly shaped key."""
    expected = expected_shapes(config)
    check_weight_names(expected, state_dict, source)
    for key, shape in expected.items():
        got = tuple(state_dict[key].shape)
        if got != shape:
            raise LitAdapterError(
                f"{source}: weight {key!r} has shape {list(got)}, expected {list(shape)} for {config.name}"
            )


def require_checkpoint_dir(checkpoint_dir: PathLike) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise LitAdapterError(f"{checkpoint_dir}: checkpoint folder not found; create one with `lit-adapter convert`")
    return checkpoint_dir


def load_config(checkpoint_dir: PathLike) -> ModelConfig:
    checkpoint_dir = require_checkpoint_dir(checkpoint_dir)
    path = checkpoint_dir / CONFIG_FILE
    if not path.is_file():
        raise LitAdapterError(f"{path}: missing; is {checkpoint_dir} a folder written by `lit-adapter convert`?")
    data = load_yaml(path)
    check_model_config_fields(data, source=str(path))
    try:
        return ModelConfig.from_dict(data, source=str(path))
    except (TypeError, ValueError, ArithmeticError) as err:
        raise LitAdapterError(f"{path}: {err}; fix the file or convert the checkpoint again") from None
    except LitAdapterError as err:  # the dataclass's own checks (dim and heads) name the config, not the file
        raise LitAdapterError(f"{path}: {err}") from None


def tokenizer_path(checkpoint_dir: PathLike) -> Path:
    """The folder's tokenizer.model, else its tokenizer.json."""
    path = find_tokenizer_file(require_checkpoint_dir(checkpoint_dir))
    if path is None:
        raise LitAdapterError(f"{Path(checkpoint_dir) / TOKENIZER_FILE}: tokenizer missing (no tokenizer.model or "
                              "tokenizer.json); convert again with `--tokenizer FILE`")
    return path


def load_weights(checkpoint_dir: PathLike, config: ModelConfig, device="cpu", dtype=None) -> dict[str, torch.Tensor]:
    path = Path(checkpoint_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise LitAdapterError(f"{path}: missing; is {checkpoint_dir} a folder written by `lit-adapter convert`?")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise LitAdapterError(f"{path}: cannot read safetensors file ({err})") from None
    check_state_dict(tensors, config, source=str(path))
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    return tensors


def load_model(checkpoint_dir: PathLike, device="cpu", dtype: Optional[torch.dtype] = None) -> LLaMA:
    """Build the model on the meta device and fill it with the folder's weights: one copy in memory."""
    config = load_config(checkpoint_dir)
    model = meta_model(config)
    model.load_state_dict(load_weights(checkpoint_dir, config, device, dtype), strict=False, assign=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()
