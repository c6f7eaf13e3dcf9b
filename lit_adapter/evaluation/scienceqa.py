"""ScienceQA scoring: answer parsing, the paper's categories, per-category accuracy and its table.

Categories follow the official evaluator (lupantech/ScienceQA `tools/evaluate_acc.py`):
NAT/SOC/LAN by subject; TXT = the hint is non-empty, IMG = the problem has an image (a problem can be both),
NO = neither; G1-6 / G7-12 by grade. "Avg" is over every scored problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
from torchmetrics import MeanMetric

from lit_adapter.data.scienceqa import grade_number
from lit_adapter.errors import LitAdapterError
from lit_adapter.prompts import OPTION_LETTERS

CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
COLUMNS = ("Avg", *CATEGORIES)
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}

# "The answer is (B)." / "the answer is (b)" / "The answer is B, because ..." / "the answer is b.": a bare lower-case
# letter counts only before punctuation or the end, so that "the answer is a bird" is not read as option A
_ANSWER_IS = re.compile(
    r"(?i:the answer is)\s*(?:\(\s*([A-Za-z])\s*\)|([A-Z])(?![A-Za-z])|([a-z])(?=[.,;:!?]|\s*$))"
)
# a reply that is just the letter: "B", "(B)", "B.", "b"
_BARE_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:]?")
# a reply that opens with the letter and then explains: "B. Because ...", "(B) Because ..." (upper case only, so
# that an ordinary sentence starting with "A ..." is not read as option A)
_LEADING_LETTER = re.compile(r"\(?([A-Z])(?:\)|[.:])\s")


class ScoredProblem(Protocol):
    """What scoring needs from a problem (`lit_adapter.data.scienceqa.ScienceQAProblem` has it)."""

    pid: str
    answer: int
    choices: list[str]
    subject: str
    grade: Any
    hint: str
    image: Optional[str]


def parse_answer(text: str, num_choices: int) -> Optional[int]:
    """The chosen option's index in `text`, or None when no option (or one outside the choices) can be read.

    "The answer is (X)" may appear several times (a model that repeats itself); it counts only when every
    occurrence names the same letter, like the official evaluator that accepts exactly one.
    """
    text = text.strip()
    letters = {"".join(groups).upper() for groups in _ANSWER_IS.findall(text)}
    if not letters:
        match = _BARE_LETTER.fullmatch(text) or _LEADING_LETTER.match(text)
        letters = {match.group(1).upper()} if match else set()
    if len(letters) != 1:
        return None
    index = OPTION_LETTERS.index(letters.pop())
    return index if index < num_choices else None


def categories(problem: ScoredProblem) -> list[str]:
    """The paper's categories this problem belongs to (one subject, one or two modalities or NO, one grade band)."""
    subject = SUBJECTS.get(str(problem.subject).strip().lower())
    if subject is None:
        raise LitAdapterError(
            f"problem {problem.pid}: subject {problem.subject!r} is not one of {', '.join(SUBJECTS)}"
        )
    found = [subject]
    has_text, has_image = bool(problem.hint), bool(problem.image)
    found += [name for name, present in (("TXT", has_text), ("IMG", has_image)) if present]
    if not has_text and not has_image:
        found.append("NO")
    found.append("G1-6" if grade_number(problem.grade, problem.pid) <= 6 else "G7-12")
    return found


@dataclass
class ColumnScore:
    accuracy: Optional[float]  # percent; None when the column has no problems
    correct: int
    total: int


class ScienceQAScorer:
    """Accumulates (problem, predicted index) pairs; accuracy per column via torchmetrics MeanMetric."""

    def __init__(self) -> None:
        self.accuracy = {column: MeanMetric() for column in COLUMNS}
        self.correct = dict.fromkeys(COLUMNS, 0)
        self.total = dict.fromkeys(COLUMNS, 0)
        self.unparseable = 0

    def update(self, problem: ScoredProblem, prediction: Optional[int]) -> bool:
        """Adds one problem; returns whether the prediction is correct (None counts as wrong and as unparseable)."""
        correct = prediction is not None and prediction == problem.answer
        self.unparseable += prediction is None
        for column in ("Avg", *categories(problem)):
            self.accuracy[column].update(torch.tensor(float(correct)))
            self.correct[column] += correct
            self.total[column] += 1
        return correct

    def compute(self) -> dict[str, ColumnScore]:
        return {
            column: ColumnScore(
                accuracy=100.0 * float(self.accuracy[column].compute()) if self.total[column] else None,
                correct=self.correct[column],
                total=self.total[column],
            )
            for column in COLUMNS
        }

    def to_dict(self) -> dict[str, Any]:
        scores = self.compute()
        return {
            "num_problems": self.total["Avg"],
            "unparseable": self.unparseable,
            "accuracy": {c: None if s.accuracy is None else round(s.accuracy, 4) for c, s in scores.items()},
            "correct": {c: s.correct for c, s in scores.items()},
            "total": {c: s.total for c, s in scores.items()},
        }

    def table(self) -> str:
        """The paper's column order, accuracy (%) over counts, then the unparseable count."""
        scores = self.compute()
        width = 7
        header = "".join(f"{c:>{width}}" for c in COLUMNS)
        accuracy = "".join(
            f"{'-' if s.accuracy is None else f'{s.accuracy:.2f}':>{width}}" for s in scores.values()
        )
        counts = "".join(f"{s.total:>{width}}" for s in scores.values())
        total = self.total["Avg"]
        return "\n".join([
            f"{'':<6}{header}",
            f"{'acc %':<6}{accuracy}",
            f"{'n':<6}{counts}",
            f"unparseable answers: {self.unparseable} of {total}",
        ])
