"""The files an evaluation run leaves in its output folder.

`predictions.jsonl` grows one line per problem (written in one call and flushed, so a stopped run loses at most
the line being written, which the next run repairs); `settings.json` records what the predictions depend on, so a
resumed run cannot mix predictions from different models or prompts; `metrics.json` holds the final scores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from lit_adapter.errors import LitAdapterError
from lit_adapter.files import read_json, write_json, write_jsonl  # noqa: F401  (write_json: for the run's metrics)

PREDICTIONS_FILE = "predictions.jsonl"
SETTINGS_FILE = "settings.json"
METRICS_FILE = "metrics.json"


def prediction_record(
    pid: str, output: str, prediction: Optional[int], answer: int, **extra: Any
) -> dict[str, Any]:
    return {
        "pid": pid,
        "output": output,
        "prediction": prediction,
        "answer": answer,
        "correct": prediction is not None and prediction == answer,
        **extra,
    }


def check_settings(output_dir: Path, settings: dict[str, Any]) -> None:
    """Write the run's settings, or, when resuming, fail if the folder holds predictions made differently."""
    path = output_dir / SETTINGS_FILE
    if path.is_file():
        previous = read_json(path, "evaluation settings")
        changed = [key for key in settings if previous.get(key) != settings[key]]
        if changed:
            key = changed[0]
            raise LitAdapterError(
                f"{output_dir} holds predictions made with {key}={previous.get(key)!r} (now {settings[key]!r}): "
                "choose another --output, or remove the folder to start over"
            )
        return
    write_json(settings, path)


class PredictionLog:
    """Appends prediction records to `predictions.jsonl` and reads back the ones already there."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / PREDICTIONS_FILE

    def read(self) -> dict[str, dict[str, Any]]:
        """Records by pid. A torn last line (the run was stopped mid-write) is dropped from the file."""
        if not self.path.is_file():
            return {}
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        records: dict[str, dict[str, Any]] = {}
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # the unterminated last line
                    self._truncate(len(text[: len(text) - len(line)].encode("utf-8")))
                    break
                raise LitAdapterError(
                    f"{self.path}: line {number} is not valid JSON; remove the line or the file"
                ) from None
            if not isinstance(record, dict) or "pid" not in record:
                raise LitAdapterError(f"{self.path}: line {number} is not a prediction record (no 'pid')")
            records[str(record["pid"])] = record
        return records

    def _truncate(self, size_bytes: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(size_bytes)

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        write_jsonl(records, self.path)
