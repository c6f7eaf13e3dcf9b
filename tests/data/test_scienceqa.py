from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_adapter.adapters.visual import TINY_CLIP_MODEL, image_transform
from lit_adapter.data.encoding import IGNORE_INDEX, collate
from lit_adapter.data.scienceqa import (
    ScienceQADataModule,
    ScienceQADataset,
    build_prompt,
    load_captions,
    load_problems,
    target_text,
)
from lit_adapter.errors import LitAdapterError
from lit_adapter.prompts import ALPACA
from tests.helpers import write_image


@pytest.fixture(scope="module")
def sqa(assets: Path) -> Path:
    return assets / "scienceqa"


@pytest.fixture(scope="module")
def raw_problems(sqa: Path) -> dict:
    return json.loads((sqa / "problems.json").read_text())


def official_qcm_input(problem: dict, caption: str) -> str:
    """The official ScienceQA `create_one_example` input for the QCM format, restated (models/base_prompt.py)."""
    context = " ".join([problem["hint"], caption]).strip() or "N/A"
    choices = " ".join(f"({'ABCDE'[i]}) {c}" for i, c in enumerate(problem["choices"]))
    return f"Question: {problem['question']}\nContext: {context}\nOptions: {choices}\n"


def test_splits_and_problem_fields(sqa, raw_problems):
    splits = {name: load_problems(sqa, name) for name in ("train", "val", "test")}
    assert {name: len(problems) for name, problems in splits.items()} == {"train": 50, "val": 50, "test": 50}
    pids = [p.pid for problems in splits.values() for p in problems]
    assert len(set(pids)) == 150 == len(raw_problems)
    for name, problems in splits.items():
        for problem in problems:
            raw = raw_problems[problem.pid]
            assert raw["split"] == name == problem.split
            assert (problem.question, problem.choices) == (raw["question"], raw["choices"])
            assert problem.answer == raw["answer"] and problem.hint == raw["hint"]
            assert problem.subject in ("natural science", "social science", "language science")
            assert problem.grade == raw["grade"] and 1 <= problem.grade_number <= 12


def test_context_modality_follows_the_official_evaluator(sqa, raw_problems):
    problems = load_problems(sqa, "test")
    raw = [raw_problems[p.pid] for p in problems]
    assert sum(p.has_text for p in problems) == sum(bool(r["hint"]) for r in raw)
    assert sum(p.has_image for p in problems) == sum(bool(r["image"]) for r in raw)
    assert sum(p.no_context for p in problems) == sum(not r["hint"] and not r["image"] for r in raw)
    assert any(p.has_text and p.has_image for p in problems)
    for problem in problems:
        assert problem.grade_number == int(raw_problems[problem.pid]["grade"].removeprefix("grade"))


def test_prompts_and_targets(sqa, raw_problems):
    captions = load_captions(sqa / "captions.json")
    problem = next(p for p in load_problems(sqa, "train") if p.pid == "2")
    assert build_prompt(problem, captions["2"]) == (
        "Question: Identify the question that Tom and Justin's experiment can best answer.\n"
        f"Context: {problem.hint} A wooden board with a wooden head on top of it.\n"
        "Options: (A) Do ping pong balls stop rolling along the ground sooner after being launched from a 30° angle "
        "or a 45° angle? (B) Do ping pong balls travel farther when launched from a 30° angle compared to a 45° "
        "angle?\n"
    )
    assert target_text(problem) == "The answer is (B)."
    for name in ("train", "val", "test"):
        for p in load_problems(sqa, name):
            caption = captions.get(p.pid, "")
            assert build_prompt(p, caption or None) == official_qcm_input(raw_problems[p.pid], caption)
            assert build_prompt(p).startswith(f"Question: {p.question}\nContext: {p.hint or 'N/A'}\nOptions: (A) ")


def test_training_module_uses_captions_as_context(sqa, tok_path, tokenizer, tmp_path):
    module = ScienceQADataModule(sqa, tokenizer_path=tok_path, captions=sqa / "captions.json",
                                 cache_dir=tmp_path, max_seq_length=2048)  # fmt: skip
    module.setup()
    assert len(module.train_dataset) == 50 and len(module.val_dataset) == 50
    problems = load_problems(sqa, "train")
    captions = load_captions(sqa / "captions.json")
    for index in (0, 1, 17):
        problem, item = problems[index], module.train_dataset[index]
        prompt = ALPACA.apply(build_prompt(problem, captions.get(problem.pid)))
        expected = tokenizer.encode(prompt + target_text(problem), eos=True)
        assert item["input_ids"].tolist() == expected
        supervised = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(supervised[:-1]) == target_text(problem) and supervised[-1] == tokenizer.eos_id
    assert "images" not in next(iter(module.train_dataloader()))


def test_training_module_with_images(sqa, tok_path, tmp_path):
    problems = load_problems(sqa, "train")
    for problem in problems:
        if problem.image:
            write_image(tmp_path / "images" / "train" / problem.pid / problem.image)
    module = ScienceQADataModule(sqa, tokenizer_path=tok_path, val_split=None, image_dir=tmp_path / "images",
                                 clip_model=TINY_CLIP_MODEL, cache_dir=tmp_path / "cache", max_seq_length=2048,
                                 batch_size=50)  # fmt: skip
    module.setup()
    assert module.val_dataset is None and module.val_dataloader() == []
    batch = next(iter(torch.utils.data.DataLoader(module.train_dataset, batch_size=50, collate_fn=collate)))
    assert batch["images"].shape == (50, 3, 32, 32)
    assert batch["has_image"].tolist() == [bool(p.image) for p in problems]
    assert (batch["images"][~batch["has_image"]] == 0).all()
    assert batch["images"][batch["has_image"]].abs().sum() > 0


def test_plain_dataset(sqa, tokenizer, tmp_path):
    problems = load_problems(sqa, "val")
    with_image = next(i for i, p in enumerate(problems) if p.image)
    without = next(i for i, p in enumerate(problems) if not p.image)
    write_image(tmp_path / "val" / problems[with_image].pid / "image.png")  # only this one image exists
    with pytest.raises(LitAdapterError, match="problem .*: field 'image': image file .* not found"):
        ScienceQADataset(problems, tokenizer, max_seq_length=2048, image_dir=tmp_path)
    transform = image_transform(TINY_CLIP_MODEL, train=False, image_size=40)
    dataset = ScienceQADataset([problems[with_image], problems[without]], tokenizer, max_seq_length=2048,
                               image_dir=tmp_path, transform=transform)  # fmt: skip
    assert len(dataset) == 2 and dataset.report.kept == 2
    labels = dataset[0]["labels"]
    assert tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()[:-1]) == target_text(problems[with_image])
    assert dataset[0]["has_image"] and dataset[0]["image"].shape == (3, 40, 40)
    assert not dataset[1]["has_image"] and dataset[1]["image"].shape == (3, 40, 40) and not dataset[1]["image"].any()
