"""Reading record files (a JSON list or JSON Lines) with validation, and counting what was kept or skipped.

A bad record (malformed JSON line, missing or wrongly typed field, empty output, invalid UTF-8, missing or
unreadable image) either stops preparation with one line naming the file, the record and the field
(`on_bad_record="error"`), or is skipped and counted (`on_bad_record="skip"`). Nothing is dropped uncounted: the
`RecordReport` summary lists every reason.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from lit_adapter.errors import LitAdapterError

ON_BAD_RECORD = ("error", "skip")


class BadRecord(Exception):
    """One record that cannot be used: `reason` is the short category counted in the summary."""

    def __init__(self, reason: str, detail: Optional[str] = None) -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail or reason


@dataclass
class RecordReport:
    """What became of a file's records: kept, skipped (by reason), truncated. `file_name` names the file (and the
    part of it read, e.g. "problems.json[train]") in the summary."""

    file_name: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    max_seq_length: Optional[int] = None

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def summary(self) -> str:
        """e.g. "alpaca.json: 198 records kept, 2 skipped (1 empty output, 1 missing field 'instruction')"."""
        text = f"{self.file_name}: {self.kept} records kept"
        total = sum(self.skipped.values())
        if total:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
            text += f", {total} skipped ({reasons})"
        else:
            text += ", 0 skipped"
        if self.truncated:
            text += f"; {self.truncated} truncated to max_seq_length={self.max_seq_length}"
        return text

    def to_dict(self) -> dict:
        return {
            "file_name": self.file_name,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "truncated": self.truncated,
            "max_seq_length": self.max_seq_length,
        }

    @classmethod
    def from_dict(cls, data: dict) -> RecordReport:
        return cls(
            file_name=data["file_name"],
            kept=data["kept"],
            skipped=Counter(data["skipped"]),
            truncated=data["truncated"],
            max_seq_length=data["max_seq_length"],
        )


def announce(message: str) -> None:
    """Print a preparation message once (on the first process of a distributed run)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(message, file=sys.stderr, flush=True)


def check_on_bad_record(value: str) -> str:
    if value not in ON_BAD_RECORD:
        raise LitAdapterError(f"on_bad_record={value!r} is not one of {', '.join(ON_BAD_RECORD)}")
    return value


@dataclass
class RawRecord:
    """A parsed record, or the reason it could not be parsed; `line` is set for JSON Lines files."""

    index: int
    value: Any = None
    line: Optional[int] = None
    error: Optional[BadRecord] = None

    def where(self) -> str:
        return f"record {self.index}" + (f" (line {self.line})" if self.line is not None else "")


def read_records(path: Union[str, Path]) -> Iterator[RawRecord]:
    """The records of a `.jsonl` file (one JSON value per line) or a `.json` file (a list of records).

    A JSON Lines line that does not parse becomes a RawRecord with `error` set (so it can be skipped and counted);
    a `.json` file that does not parse as a whole, or is not a list, raises LitAdapterError.
    """
    path = Path(path)
    if not path.is_file():
        raise LitAdapterError(f"{path}: data file not found")
    if path.suffix == ".jsonl":
        yield from _read_json_lines(path)
        return
    data = load_json(path)
    if not isinstance(data, list):
        raise LitAdapterError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
    for index, value in enumerate(data):
        yield RawRecord(index, value)


def load_json(path: Path) -> Any:
    """A whole JSON file. Bytes that are not UTF-8 are kept as lone surrogates so that the record holding them can
    be named later (see `string_field`)."""
    try:
        text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    except OSError as err:
        raise LitAdapterError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise LitAdapterError(f"{path}: malformed JSON at line {err.lineno} column {err.colno} ({err.msg})") from None


def _read_json_lines(path: Path) -> Iterator[RawRecord]:
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as err:
        raise LitAdapterError(f"{path}: cannot read ({err.strerror})") from None
    lines[0] = lines[0].removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
    index = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        text = raw.decode("utf-8", errors="surrogateescape")
        try:
            yield RawRecord(index, json.loads(text), line=number)
        except json.JSONDecodeError as err:
            detail = f"malformed JSON ({err.msg} at column {err.colno})"
            yield RawRecord(index, line=number, error=BadRecord("malformed JSON", detail))
        index += 1


def record_object(value: Any) -> dict:
    if not isinstance(value, dict):
        raise BadRecord("record not a JSON object", f"expected a JSON object, found {type(value).__name__}")
    return value


def string_field(
    record: dict, name: str, required: bool = True, allow_empty: bool = False, label: Optional[str] = None
) -> str:
    """`record[name]` as a checked string: present (if required), a string, non-empty (unless allowed), UTF-8.
    `label` names the field in messages when it is nested (e.g. "conversations[2].value")."""
    label = label or name
    if name not in record or record[name] is None:
        if required:
            raise BadRecord(f"missing field {label!r}")
        return ""
    value = record[name]
    if not isinstance(value, str):
        raise BadRecord(
            f"wrong type for field {label!r}", f"field {label!r} must be a string, found {type(value).__name__}"
        )
    if not allow_empty and not value.strip():
        raise BadRecord(f"empty {label}", f"field {label!r} is empty")
    check_utf8(value, label)
    return value


def check_utf8(value: str, name: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRecord(
            f"invalid UTF-8 in field {name!r}", f"field {name!r} is not valid UTF-8 (character {err.start})"
        ) from None


def check_image(path: Path, name: str = "image") -> None:
    """Fail (as a BadRecord) when the image file is missing or PIL cannot read its header."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise BadRecord("missing image", f"field {name!r}: image file {path} not found")
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - reads the header
    except (OSError, UnidentifiedImageError) as err:
        raise BadRecord("unreadable image", f"field {name!r}: cannot read image {path} ({err})") from None


class RecordGate:
    """Applies the `on_bad_record` policy: raise one clear line, or count the skip in the report."""

    def __init__(self, path: Union[str, Path], report: RecordReport, on_bad_record: str) -> None:
        self.path = Path(path)
        self.report = report
        self.on_bad_record = check_on_bad_record(on_bad_record)

    def reject(self, record: RawRecord, bad: BadRecord) -> None:
        if self.on_bad_record == "error":
            raise LitAdapterError(
                f"{self.path}: {record.where()}: {bad.detail}; fix or remove it, or pass on_bad_record='skip'"
            )
        self.report.skip(bad.reason)
