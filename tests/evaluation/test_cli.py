"""`lit-adapter eval scienceqa` without a model: scoring an outputs file, help, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_adapter.cli import main

# five problems whose categories are known by construction:
# pid  subject   grade   context      answer  output                       verdict
# 1    natural   grade2  hint          B      "The answer is (B)."         right
# 2    natural   grade8  image         A      "The answer is (C)."         wrong
# 3    social    grade3  none          C      "C"                          right
# 4    language  grade10 hint + image  D      "I do not know."             unparseable
# 5    language  grade6  none          A      "the answer is (a) because"  right
PROBLEMS = {
    "1": ("natural science", "grade2", "A hint.", None, 1, 2, "The answer is (B)."),
    "2": ("natural science", "grade8", "", "image.png", 0, 3, "The answer is (C)."),
    "3": ("social science", "grade3", "", None, 2, 3, "C"),
    "4": ("language science", "grade10", "Another hint.", "image.png", 3, 4, "I do not know."),
    "5": ("language science", "grade6", "", None, 0, 2, "the answer is (a) because it is"),
}


def write_data(root: Path) -> Path:
    problems = {
        pid: {
            "question": f"Question {pid}?", "choices": [f"choice {i}" for i in range(n)], "answer": answer,
            "hint": hint, "image": image, "task": "closed choice", "grade": grade, "subject": subject,
            "topic": "t", "category": "c", "skill": "s", "lecture": "", "solution": "", "split": "test",
        }
        for pid, (subject, grade, hint, image, answer, n, _) in PROBLEMS.items()
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"test": list(PROBLEMS), "val": []}))
    return root


def write_outputs(path: Path, official: bool = False) -> Path:
    outputs = {pid: row[-1] for pid, row in PROBLEMS.items()}
    path.write_text(json.dumps({"results": {}, "outputs": outputs} if official else outputs))
    return path


@pytest.mark.parametrize("official", [False, True])
def test_outputs_file_scores_and_writes(tmp_path: Path, capsys, official: bool) -> None:
    data = write_data(tmp_path / "data")
    outputs = write_outputs(tmp_path / "outputs.json", official)
    main(["eval", "scienceqa", "--data_dir", str(data), "--outputs_file", str(outputs),
          "--output", str(tmp_path / "out")])  # returns: exit status 0

    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["Avg", "NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12"]
    assert printed[1].split() == ["acc", "%", "60.00", "50.00", "100.00", "50.00", "50.00", "0.00", "100.00",
                                  "100.00", "0.00"]
    assert printed[2].split() == ["n", "5", "2", "1", "2", "2", "2", "2", "3", "2"]
    assert printed[3] == "unparseable answers: 1 of 5"

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_problems"] == 5 and metrics["unparseable"] == 1 and metrics["missing"] == 0
    assert metrics["accuracy"] == {"Avg": 60.0, "NAT": 50.0, "SOC": 100.0, "LAN": 50.0, "TXT": 50.0, "IMG": 0.0,
                                   "NO": 100.0, "G1-6": 100.0, "G7-12": 0.0}
    assert metrics["correct"]["Avg"] == 3 and metrics["total"]["TXT"] == 2

    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["pid"], r["prediction"], r["answer"], r["correct"]) for r in records] == [
        ("1", 1, 1, True), ("2", 2, 0, False), ("3", 2, 2, True), ("4", None, 3, False), ("5", 0, 0, True)]
    assert records[3]["output"] == "I do not know."


def test_outputs_file_with_limit_and_missing_outputs(tmp_path: Path, capsys) -> None:
    data = write_data(tmp_path / "data")
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({"1": "The answer is (A).", "3": "The answer is (C).", "99": "x"}))
    main(["eval", "scienceqa", "--data_dir", str(data), "--outputs_file", str(outputs), "--limit", "4",
          "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "not scored (no output): 2 of 4 problems" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_problems"] == 2 and metrics["missing"] == 2
    assert metrics["accuracy"]["Avg"] == 50.0 and metrics["accuracy"]["SOC"] == 100.0
    assert metrics["accuracy"]["LAN"] is None


def run_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_split_is_one_line(tmp_path: Path, capsys) -> None:
    data = write_data(tmp_path / "data")
    err = run_error(["eval", "scienceqa", "--data_dir", str(data), "--split", "tset",
                     "--outputs_file", str(write_outputs(tmp_path / "o.json"))], capsys)
    assert err.startswith("error:") and "split" in err and "tset" in err and "'minitest'" in err


def test_split_missing_from_the_data_is_one_line(tmp_path: Path, capsys) -> None:
    data = write_data(tmp_path / "data")
    err = run_error(["eval", "scienceqa", "--data_dir", str(data), "--split", "minitest",
                     "--outputs_file", str(write_outputs(tmp_path / "o.json"))], capsys)
    assert "pid_splits.json" in err and "'minitest'" in err


def test_missing_data_dir_is_one_line(tmp_path: Path, capsys) -> None:
    err = run_error(["eval", "scienceqa", "--data_dir", str(tmp_path / "nowhere"),
                     "--outputs_file", str(write_outputs(tmp_path / "o.json"))], capsys)
    assert err == f"error: {tmp_path / 'nowhere'}: ScienceQA folder not found (it holds problems.json and " \
                  "pid_splits.json)"


def test_missing_required_arguments_are_one_line(tmp_path: Path, capsys) -> None:
    assert "data_dir" in run_error(["eval", "scienceqa"], capsys)
    err = run_error(["eval", "scienceqa", "--data_dir", str(write_data(tmp_path / "data"))], capsys)
    assert "--checkpoint_dir" in err and "--outputs_file" in err
    assert "bogus" in run_error(["eval", "bogus"], capsys)


def test_outputs_file_errors(tmp_path: Path, capsys) -> None:
    data = write_data(tmp_path / "data")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert "pid -> generated text" in run_error(
        ["eval", "scienceqa", "--data_dir", str(data), "--outputs_file", str(bad)], capsys)
    bad.write_text('{"1": 3}')
    assert "pid 1 is not a string" in run_error(
        ["eval", "scienceqa", "--data_dir", str(data), "--outputs_file", str(bad)], capsys)
    bad.write_text('{"nope": "A"}')
    assert "no output for any" in run_error(
        ["eval", "scienceqa", "--data_dir", str(data), "--outputs_file", str(bad)], capsys)


def test_help(capsys) -> None:
    main(["eval", "--help"])  # the stored text (tests/test_startup.py checks it is the live one)
    assert "scienceqa" in capsys.readouterr().out
    main(["eval", "scienceqa", "--help"])
    text = capsys.readouterr().out
    for option in ("--data_dir", "--split", "--checkpoint_dir", "--adapter", "--captions", "--images", "--limit",
                   "--batch_size", "--output", "--mode", "--outputs_file", "--max_new_tokens", "--precision",
                   "--device"):
        assert option in text, option
    assert "likelihood" in text and "minitest" in text
