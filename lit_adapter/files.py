"""Reading and writing the small files every room uses: JSON and YAML with one-line errors, atomic writes.

An atomic write goes to a temporary file beside the target and replaces it in one rename, so a reader (or a run
killed mid-write) never sees half a file; the new file gets the modes the umask gives (not mkstemp's 0600).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import yaml

from lit_adapter.errors import LitAdapterError, first_line

PathLike = Union[str, Path]


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it replaces `path` in one rename, on failure it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(text: str, path: PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_yaml(data: dict, path: PathLike) -> None:
    write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), path)


def load_yaml(path: PathLike) -> dict:
    """A YAML file holding a mapping."""
    path = Path(path)
    if not path.is_file():
        raise LitAdapterError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise LitAdapterError(f"{path}: invalid YAML ({first_line(err)})") from None
    if not isinstance(data, dict):
        raise LitAdapterError(f"{path}: expected a YAML mapping at the top level")
    return data


def read_json(path: PathLike, what: str = "file", expect: Optional[type] = None) -> Any:
    """A whole JSON file; `what` names it in errors ("caption file"), `expect` (dict, list) checks the top level."""
    path = Path(path)
    if not path.is_file():
        raise LitAdapterError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LitAdapterError(f"{path}: invalid JSON in {what} ({err})") from None
    if expect is not None and not isinstance(data, expect):
        kind = {dict: "an object", list: "a list"}.get(expect, expect.__name__)
        raise LitAdapterError(f"{path}: the {what} must hold {kind} at the top level, not {type(data).__name__}")
    return data


def write_json(data: Any, path: PathLike) -> None:
    write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", path)


def write_jsonl(rows: Iterable[Mapping], path: PathLike) -> None:
    write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), path)
