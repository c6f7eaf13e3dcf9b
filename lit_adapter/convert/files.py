"""Lazy reading of big weight files (torch `.pth`/`.bin` zip archives and `.safetensors`).

Both formats are memory-mapped: a tensor costs nothing until its bytes are touched, but touched pages stay resident
while the mapping lives. Converters therefore open a file once per chunk of keys, copy what they need, and close it,
so the resident part of the source never grows past one chunk while the converted copy is built.

The chunks are counted on a progress bar (tensor by tensor, on stderr, shown only on a terminal: the convention of
every long command here).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open

from lit_adapter.errors import LitAdapterError, first_line, torch_load_problem
from lit_adapter.files import read_json

# bytes of source weights kept mapped at once; small enough to be noise next to the converted copy
CHUNK_BYTES = 128 * 2**20


def read_json_object(path: Path, missing: str) -> dict:
    """A JSON file holding an object (params.json, config.json); `missing` says why the file is needed."""
    if not path.is_file():
        raise LitAdapterError(f"{path}: missing; {missing}")
    return read_json(path, path.name, expect=dict)


class WeightsFile:
    """One weights file: its keys, shapes and dtypes are read up front; the data only inside `open()`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise LitAdapterError(f"{self.path}: weights file not found")
        with self.open() as tensors:
            self.shapes = {k: tuple(tensors[k].shape) for k in tensors.keys()}
            self.dtypes = {k: tensors[k].dtype for k in tensors.keys()}

    def keys(self) -> list[str]:
        return list(self.shapes)

    def nbytes(self, key: str) -> int:
        return torch.Size(self.shapes[key]).numel() * self.dtypes[key].itemsize

    @contextmanager
    def open(self) -> Iterator[Mapping[str, torch.Tensor]]:
        """Yields the file's tensors as views of the mapped file, valid only inside the block: on leaving it the
        mapping is dropped (callers keep only copies)."""
        if self.path.suffix == ".safetensors":
            try:
                handle = safe_open(str(self.path), framework="pt", device="cpu")
            except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
                raise LitAdapterError(f"{self.path}: cannot read safetensors file ({first_line(err)})") from None
            view = _SafetensorsView(handle, self.path)
            with handle:
                try:
                    yield view
                finally:
                    view.handle = None
        else:
            tensors = self._torch_load()
            try:
                yield tensors
            finally:
                tensors.clear()

    def _torch_load(self) -> dict[str, torch.Tensor]:
        if not zipfile.is_zipfile(self.path):  # torch.load's own error for a cut-off archive says nothing useful
            raise LitAdapterError(
                f"{self.path}: not a readable torch checkpoint (truncated or corrupt, or torch's pre-1.6 format)"
            )
        try:
            tensors = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:  # truncated zip, not a torch file, unsafe pickle, ...
            raise LitAdapterError(f"{self.path}: {torch_load_problem(err)}") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise LitAdapterError(f"{self.path}: expected a dict of tensors, got {type(tensors).__name__}")
        return tensors


class _SafetensorsView(Mapping[str, torch.Tensor]):
    def __init__(self, handle, path: Path) -> None:
        self.handle, self.path = handle, path
        self.names = list(handle.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self.handle.get_tensor(key)
        except Exception as err:
            raise LitAdapterError(f"{self.path}: cannot read tensor {key!r} ({first_line(err)})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def progress(total: int, desc: str, unit: str = "tensor") -> Any:
    """A tqdm bar on stderr for `total` steps, shown only when stderr is a terminal (quiet in logs and pipes)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False, dynamic_ncols=True)


def chunks(keys: Iterable[str], nbytes: Callable[[str], int], budget: int = 0,
           desc: Optional[str] = "tensors") -> Iterator[list[str]]:
    """Consecutive groups of keys of at most `budget` bytes each (a bigger tensor gets a group of its own). A
    group's tensors count on a progress bar named `desc` (None: no bar) once the caller asks for the next group."""
    budget = budget or CHUNK_BYTES
    keys = list(keys)
    with progress(len(keys), desc) if desc is not None else _NoBar() as bar:
        group: list[str] = []
        size = 0
        for key in keys:
            if group and size + nbytes(key) > budget:
                yield group
                bar.update(len(group))
                group, size = [], 0
            group.append(key)
            size += nbytes(key)
        if group:
            yield group
            bar.update(len(group))


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int) -> None:
        return None
