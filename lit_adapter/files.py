"""Reading and writing the small files every room uses: JSON and YAML with one-line errors, atomic writes.

An atomic write goes to a temporary file beside the target and replaces it in one rename, so a reader (or a run
killed mid-write) never sees half a file. Modes are those `open()` and `mkdir()` give: a new file gets 0666 less the
umask (0644 under umask 022, not mkstemp's 0600), a replaced file keeps its mode, and a folder made through
`temporary_dir` gets 0777 less the umask (not mkdtemp's 0700). The temporary names are `.NAME.XXXXXXXX.tmp`: a write
killed midway leaves one behind, which `remove_stale_temporaries` recognises.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import yaml

from lit_adapter.errors import LitAdapterError, first_line

PathLike = Union[str, Path]


TEMP_SUFFIX = ".tmp"
# what tempfile.mkstemp / mkdtemp make of prefix ".NAME." and suffix ".tmp": 8 characters of its alphabet in between
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (setting it to read it, the only portable
    way, would briefly give any file another thread creates meanwhile the wrong modes)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open()` gives a new file: 0666 less the umask."""
    return 0o666 & ~umask()


def folder_mode() -> int:
    """The mode `mkdir()` gives a new folder: 0777 less the umask."""
    return 0o777 & ~umask()


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it replaces `path` in one rename, on failure it vanishes.

    The result has the mode `open(path, "w")` would leave: the mode of the file it replaces, else 0666 less the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        try:
            mode = path.stat().st_mode & 0o7777 if path.is_file() else file_mode()
        except OSError:
            mode = file_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def temporary_dir(folder: PathLike) -> Path:
    """A new empty folder beside `folder` (`.NAME.XXXXXXXX.tmp`) with the mode `mkdir()` gives, to be filled and then
    renamed onto `folder`; the caller removes it when that fails."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=TEMP_SUFFIX, dir=folder.parent))
    os.chmod(tmp, folder_mode())
    return tmp


def temporary_target(name: str) -> Optional[str]:
    """The name a temporary of `atomic_path` or `temporary_dir` stands for (".last.ckpt.ab12cd34.tmp" ->
    "last.ckpt"), or None for any other name."""
    match = _TEMPORARY.match(name)
    return match["name"] if match else None


def remove_stale_temporaries(folder: PathLike, targets: Optional[Callable[[str], bool]] = None) -> list[Path]:
    """Remove what killed writes left in `folder`: the temporaries of `atomic_path` / `temporary_dir` (those whose
    target name `targets` accepts, default all). Only for a folder no other process is writing into now. Returns
    what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        target = temporary_target(entry.name)
        if target is None or (targets is not None and not targets(target)):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue
        removed.append(entry)
    return removed


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
