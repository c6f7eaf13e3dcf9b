"""The prediction log of an output folder: appending, reading back, repairing a torn last line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_adapter.errors import LitAdapterError
from lit_adapter.evaluation.results import PredictionLog, check_settings, prediction_record


def test_append_and_read(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path / "out")
    assert log.read() == {}
    log.append(prediction_record("7", "The answer is (B).", 1, 1))
    log.append(prediction_record("8", "é?", None, 0, truncated=True))
    records = log.read()
    assert list(records) == ["7", "8"]
    assert records["7"] == {"pid": "7", "output": "The answer is (B).", "prediction": 1, "answer": 1,
                            "correct": True}
    assert records["8"]["correct"] is False and records["8"]["truncated"] is True
    assert log.path.read_text(encoding="utf-8").count("\n") == 2


def test_torn_last_line_is_dropped_from_the_file(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path)
    log.append(prediction_record("1", "ü", 0, 0))
    good = log.path.read_bytes()
    with open(log.path, "a", encoding="utf-8") as f:
        f.write('{"pid": "2", "output": "Th')
    assert list(log.read()) == ["1"]
    assert log.path.read_bytes() == good
    log.append(prediction_record("2", "B", 1, 0))
    assert [json.loads(line)["pid"] for line in log.path.read_text().splitlines()] == ["1", "2"]


def test_corrupt_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path)
    log.path.write_text('{"pid": "1"}\nnot json\n{"pid": "3"}\n')
    with pytest.raises(LitAdapterError, match="line 2 is not valid JSON"):
        log.read()
    log.path.write_text('{"pid": "1"}\n[1, 2]\n')
    with pytest.raises(LitAdapterError, match="line 2 is not a prediction record"):
        log.read()


def test_settings_are_kept_and_compared(tmp_path: Path) -> None:
    check_settings(tmp_path, {"split": "test", "mode": "generate"})
    check_settings(tmp_path, {"split": "test", "mode": "generate"})  # same settings: resume
    with pytest.raises(LitAdapterError, match="split='test' \\(now 'val'\\)"):
        check_settings(tmp_path, {"split": "val", "mode": "generate"})
