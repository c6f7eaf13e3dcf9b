"""Category membership and per-category accuracy arithmetic on hand-made problems."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lit_adapter.errors import LitAdapterError
from lit_adapter.evaluation.scienceqa import COLUMNS, ScienceQAScorer, categories, grade_number


def problem(pid, subject, grade, hint="", image=None, answer=0, n=4):
    return SimpleNamespace(pid=pid, subject=subject, grade=grade, hint=hint, image=image, answer=answer,
                           choices=[f"c{i}" for i in range(n)])


def test_categories_follow_the_official_definitions() -> None:
    assert categories(problem("1", "natural science", "grade1")) == ["NAT", "NO", "G1-6"]
    assert categories(problem("2", "social science", "grade6", hint="a map")) == ["SOC", "TXT", "G1-6"]
    assert categories(problem("3", "language science", "grade7", image="image.png")) == ["LAN", "IMG", "G7-12"]
    # text and image context: both TXT and IMG, not NO
    assert categories(problem("4", "natural science", "grade12", hint="h", image="image.png")) == [
        "NAT", "TXT", "IMG", "G7-12"]


def test_grades() -> None:
    assert [grade_number(f"grade{g}") for g in range(1, 13)] == list(range(1, 13))
    assert grade_number(8) == 8
    for bad in ("grade0", "grade13", "seventh", ""):
        with pytest.raises(LitAdapterError, match="grade"):
            grade_number(bad, pid="9")


def test_unknown_subject_names_the_problem() -> None:
    with pytest.raises(LitAdapterError, match="problem 7: subject 'math'"):
        categories(problem("7", "math", "grade3"))


def test_accuracy_per_column() -> None:
    # 5 problems, 3 right; hand-computed per column below
    cases = [
        (problem("a", "natural science", "grade2", hint="h", answer=1), 1),  # right: NAT TXT G1-6
        (problem("b", "natural science", "grade8", image="i.png", answer=0), 2),  # wrong: NAT IMG G7-12
        (problem("c", "social science", "grade3", answer=2), 2),  # right: SOC NO G1-6
        (problem("d", "language science", "grade10", hint="h", image="i.png", answer=3), None),  # unparseable
        (problem("e", "language science", "grade6", answer=0), 0),  # right: LAN NO G1-6
    ]
    scorer = ScienceQAScorer()
    assert [scorer.update(p, pred) for p, pred in cases] == [True, False, True, False, True]
    scores = scorer.compute()
    expected = {  # column: (correct, total)
        "Avg": (3, 5), "NAT": (1, 2), "SOC": (1, 1), "LAN": (1, 2), "TXT": (1, 2), "IMG": (0, 2), "NO": (2, 2),
        "G1-6": (3, 3), "G7-12": (0, 2),
    }
    assert list(scores) == list(COLUMNS)
    for column, (correct, total) in expected.items():
        assert (scores[column].correct, scores[column].total) == (correct, total), column
        assert scores[column].accuracy == pytest.approx(100.0 * correct / total), column
    assert scorer.unparseable == 1
    table = scorer.table().splitlines()
    assert table[0].split() == list(COLUMNS)
    assert table[1].split() == ["acc", "%", "60.00", "50.00", "100.00", "50.00", "50.00", "0.00", "100.00",
                                "100.00", "0.00"]
    assert table[2].split() == ["n", "5", "2", "1", "2", "2", "2", "2", "3", "2"]
    assert table[3] == "unparseable answers: 1 of 5"


def test_empty_column_has_no_accuracy() -> None:
    scorer = ScienceQAScorer()
    scorer.update(problem("a", "natural science", "grade2", answer=0), 0)
    scores = scorer.compute()
    assert scores["SOC"].accuracy is None and scores["SOC"].total == 0
    assert scorer.to_dict()["accuracy"]["SOC"] is None
    assert scorer.table().splitlines()[1].split()[2:] == ["100.00", "100.00", "-", "-", "-", "-", "100.00",
                                                         "100.00", "-"]
