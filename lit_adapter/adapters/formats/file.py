"""An adapter read from disk, whatever its format, and the one check of its tensors against a model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Union

import torch

from lit_adapter.adapters.config import AdapterConfig
from lit_adapter.errors import LitAdapterError

PathLike = Union[str, Path]
Tensors = dict[str, torch.Tensor]


@dataclasses.dataclass
class AdapterFile:
    """An adapter read from disk: its config and tensors named as in AdapterModel (`llama.layers.3...`).

    `origin` maps our key to the file's own key where they differ (official files, legacy names), so that messages
    name what the user can find in the file.
    """

    config: AdapterConfig
    tensors: Tensors
    path: Path
    kind: str  # "lit-adapter", "official-v1", "official-v2" or "official-65b"
    origin: dict[str, str] = dataclasses.field(default_factory=dict)

    def file_key(self, key: str) -> str:
        """The file's own name for our key `key`."""
        return self.origin.get(key, key)


def check_adapter_tensors(adapter: AdapterFile, expected: Mapping[str, tuple[int, ...]]) -> None:
    """The strict check of `load_state_dict(strict=True)`, as one line naming the file and the file's own key.

    Args:
        adapter: the file read.
        expected: our key -> shape of every adapter parameter of the model it goes into.
    """
    def named(key: str) -> str:
        return repr(adapter.file_key(key))

    for key, tensor in adapter.tensors.items():
        if key not in expected:
            raise LitAdapterError(f"{adapter.path}: unexpected key {named(key)} for this adapter config "
                                  f"({len(expected)} tensors expected)")
        if tuple(tensor.shape) != tuple(expected[key]):
            raise LitAdapterError(f"{adapter.path}: key {named(key)} has shape {list(tensor.shape)}, expected "
                                  f"{list(expected[key])}: the adapter is for another base model or config")
    missing = [key for key in expected if key not in adapter.tensors]
    if missing:
        raise LitAdapterError(f"{adapter.path}: missing key {named(missing[0])} ({len(missing)} missing in all)")
