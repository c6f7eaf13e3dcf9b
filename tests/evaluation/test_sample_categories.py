"""The paper's categories on the 150-problem ScienceQA sample, checked against counts computed here from the raw
json with the official evaluator's definitions (TXT: non-empty hint; IMG: an image; NO: neither)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_adapter.data.scienceqa import load_problems
from lit_adapter.evaluation.scienceqa import ScienceQAScorer, categories


def raw_problems(assets: Path) -> tuple[dict, dict]:
    root = assets / "scienceqa"
    return json.loads((root / "problems.json").read_text()), json.loads((root / "pid_splits.json").read_text())


def predicted(pid: str, raw: dict) -> int:
    """A fixed mix of right and wrong answers: wrong on every third problem id."""
    return raw["answer"] if int(pid) % 3 else (raw["answer"] + 1) % len(raw["choices"])


def expected_columns(pids: list[str], problems: dict) -> dict[str, tuple[int, int]]:
    """(correct, total) per column, straight from the raw records."""
    members = {
        "Avg": lambda r: True,
        "NAT": lambda r: r["subject"] == "natural science",
        "SOC": lambda r: r["subject"] == "social science",
        "LAN": lambda r: r["subject"] == "language science",
        "TXT": lambda r: r["hint"] != "",
        "IMG": lambda r: r["image"] is not None,
        "NO": lambda r: r["hint"] == "" and r["image"] is None,
        "G1-6": lambda r: int(r["grade"][len("grade"):]) in range(1, 7),
        "G7-12": lambda r: int(r["grade"][len("grade"):]) in range(7, 13),
    }
    out = {}
    for column, member in members.items():
        chosen = [pid for pid in pids if member(problems[pid])]
        correct = sum(predicted(pid, problems[pid]) == problems[pid]["answer"] for pid in chosen)
        out[column] = (correct, len(chosen))
    return out


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_sample_categories_and_accuracy(assets: Path, split: str) -> None:
    problems, splits = raw_problems(assets)
    pids = [str(pid) for pid in splits[split]]
    expected = expected_columns(pids, problems)

    scorer = ScienceQAScorer()
    loaded = load_problems(assets / "scienceqa", split)
    assert [p.pid for p in loaded] == pids
    for problem in loaded:
        scorer.update(problem, predicted(problem.pid, problems[problem.pid]))
    scores = scorer.compute()

    for column, (correct, total) in expected.items():
        assert (scores[column].correct, scores[column].total) == (correct, total), column
        assert scores[column].accuracy == pytest.approx(100 * correct / total), column
    n = len(pids)
    assert n == 50
    assert scores["NAT"].total + scores["SOC"].total + scores["LAN"].total == n
    assert scores["G1-6"].total + scores["G7-12"].total == n
    both = sum(bool(problems[pid]["hint"]) and bool(problems[pid]["image"]) for pid in pids)
    assert scores["TXT"].total + scores["IMG"].total - both + scores["NO"].total == n


def test_test_split_counts(assets: Path) -> None:
    """The sample's test split as counted once from the file (16 problems have both a hint and an image)."""
    scorer = ScienceQAScorer()
    for problem in load_problems(assets / "scienceqa", "test"):
        scorer.update(problem, problem.answer)
    totals = {column: score.total for column, score in scorer.compute().items()}
    assert totals == {"Avg": 50, "NAT": 30, "SOC": 9, "LAN": 11, "TXT": 25, "IMG": 24, "NO": 17, "G1-6": 36,
                      "G7-12": 14}
    assert scorer.compute()["Avg"].accuracy == 100.0 and scorer.unparseable == 0


def test_categories_agree_with_the_problem_metadata(assets: Path) -> None:
    for split in ("train", "val", "test"):
        for problem in load_problems(assets / "scienceqa", split):
            cats = categories(problem)
            assert ("TXT" in cats, "IMG" in cats, "NO" in cats) == (
                problem.has_text, problem.has_image, problem.no_context
            )
            assert ("G1-6" in cats) == (problem.grade_number <= 6) != ("G7-12" in cats)
