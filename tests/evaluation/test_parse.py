"""Reading the chosen option from generated text, like the official ScienceQA evaluator."""

from __future__ import annotations

import pytest

from lit_adapter.evaluation.scienceqa import parse_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is (B).", 1),
        ("The answer is B.", 1),
        ("The answer is (A)", 0),
        ("B", 1),
        ("(C)", 2),
        ("b", 1),
        ("D.", 3),
        ("the answer is (b)", 1),
        ("THE ANSWER IS (c).", 2),
        ("the answer is b.", 1),
        ("The answer is (C). Because salt dissolves in water, the mixture is a solution.", 2),
        ("The answer is B because the map shows it.", 1),
        ("   \n  The answer is (D).\n", 3),
        ("B. Birds have feathers.", 1),
        ("(A) is right", 0),
        ("The answer is (A). The answer is (A).", 0),  # a model repeating itself
    ],
)
def test_readable_answers(text: str, expected: int) -> None:
    assert parse_answer(text, num_choices=4) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "Once upon a time there was a girl named Lily.",
        "A big dog ran to the park.",  # a sentence starting with "A" is not option A
        "The answer is a bird.",  # nor is the article after "the answer is"
        "The answer is (A). No wait, the answer is (B).",  # contradicting itself
        "The answer is ().",
    ],
)
def test_unreadable_answers(text: str) -> None:
    assert parse_answer(text, num_choices=4) is None


@pytest.mark.parametrize(("text", "choices"), [("The answer is (C).", 2), ("E", 4), ("The answer is (Z).", 5)])
def test_letter_outside_the_options_is_unreadable(text: str, choices: int) -> None:
    assert parse_answer(text, num_choices=choices) is None


def test_last_option_is_readable() -> None:
    assert parse_answer("The answer is (E).", num_choices=5) == 4
    assert parse_answer("The answer is (B).", num_choices=2) == 1
