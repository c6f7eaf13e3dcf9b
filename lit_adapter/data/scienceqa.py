"""ScienceQA: the official `problems.json` + `pid_splits.json`, prompts, targets and a training data module.

Prompt (the official "QCM" input format, used as the instruction of the prompt style):
    "Question: {question}\nContext: {hint and caption, or N/A}\nOptions: (A) {choice} (B) {choice}\n"
Target: "The answer is (X)." Images live in `images/<split>/<pid>/image.png` (the official layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch.utils.data import Dataset

from lit_adapter.data.base import TokenizedDataModule
from lit_adapter.data.encoding import EncodedSamples, SampleBuilder, TokenizedDataset, encode_segments
from lit_adapter.data.records import BadRecord, RawRecord, RecordGate, RecordReport, check_image
from lit_adapter.errors import LitAdapterError
from lit_adapter.files import read_json
from lit_adapter.images import load_image
from lit_adapter.prompts import OPTION_LETTERS, PromptStyle, get_prompt_style
from lit_adapter.tokenizer import Tokenizer

PROBLEMS_FILE = "problems.json"
SPLITS_FILE = "pid_splits.json"


@dataclass(frozen=True)
class ScienceQAProblem:
    pid: str
    question: str
    choices: list[str]
    answer: int
    hint: str
    image: Optional[str]
    subject: str
    grade: str
    split: str = ""
    lecture: str = field(default="", repr=False)
    solution: str = field(default="", repr=False)

    # context modality, as the official evaluator defines it (TXT and IMG can both hold)
    @property
    def has_text(self) -> bool:
        return bool(self.hint)

    @property
    def has_image(self) -> bool:
        return bool(self.image)

    @property
    def no_context(self) -> bool:
        return not self.hint and not self.image

    @property
    def grade_number(self) -> int:
        return grade_number(self.grade, self.pid)


def grade_number(grade: Any, pid: str = "?") -> int:
    """1..12 from the official "grade7" (or a plain number)."""
    text = str(grade).strip().lower().removeprefix("grade")
    if not text.isdigit() or not 1 <= int(text) <= 12:
        raise LitAdapterError(f"problem {pid}: grade {grade!r} is not grade1..grade12")
    return int(text)


def load_problems(data_dir: Union[str, Path], split: str) -> list[ScienceQAProblem]:
    """The problems of `split` (a key of pid_splits.json: train, val, test, minival, minitest, ...), in file order."""
    data_dir = Path(data_dir)
    problems = read_json(data_dir / PROBLEMS_FILE, PROBLEMS_FILE)
    splits = read_json(data_dir / SPLITS_FILE, SPLITS_FILE)
    if not isinstance(problems, dict) or not isinstance(splits, dict):
        raise LitAdapterError(f"{data_dir}: {PROBLEMS_FILE} and {SPLITS_FILE} must each hold a JSON object")
    if split not in splits:
        raise LitAdapterError(
            f"{data_dir / SPLITS_FILE}: unknown split {split!r}; valid splits: {', '.join(sorted(splits))}"
        )
    out = []
    for pid in splits[split]:
        pid = str(pid)
        if pid not in problems:
            raise LitAdapterError(f"{data_dir / PROBLEMS_FILE}: problem {pid} of split {split!r} is missing")
        out.append(_problem(pid, problems[pid], data_dir / PROBLEMS_FILE))
    return out


def load_captions(path: Union[str, Path]) -> dict[str, str]:
    """`{"captions": {pid: text}}` (the official captions.json) -> {pid: text}."""
    data = read_json(path, "caption file")
    captions = data.get("captions") if isinstance(data, dict) else None
    if not isinstance(captions, dict):
        raise LitAdapterError(f"{path}: expected {{\"captions\": {{pid: text}}}}")
    return {str(pid): str(text) for pid, text in captions.items()}


def context_text(problem: ScienceQAProblem, caption: Optional[str] = None) -> str:
    """The hint, then the caption (if given), joined by a space; "N/A" when both are empty (official rule)."""
    return " ".join([problem.hint, caption or ""]).strip() or "N/A"


def build_prompt(problem: ScienceQAProblem, caption: Optional[str] = None) -> str:
    options = " ".join(f"({OPTION_LETTERS[i]}) {choice}" for i, choice in enumerate(problem.choices))
    return f"Question: {problem.question}\nContext: {context_text(problem, caption)}\nOptions: {options}\n"


def target_text(problem: ScienceQAProblem) -> str:
    return f"The answer is ({OPTION_LETTERS[problem.answer]})."


def image_path(problem: ScienceQAProblem, image_dir: Path) -> Optional[Path]:
    """`image_dir/<split>/<pid>/<image>` (image_dir = the official `images` folder) or `image_dir/<pid>/<image>`
    (image_dir = one split's folder); None for a problem without an image."""
    if not problem.image:
        return None
    candidates = [image_dir / problem.split / problem.pid / problem.image] if problem.split else []
    candidates.append(image_dir / problem.pid / problem.image)
    return next((path for path in candidates if path.is_file()), candidates[0])


def _problem(pid: str, raw: dict, path: Path) -> ScienceQAProblem:
    def checked(name: str, kind: type, default=None):
        value = raw.get(name, default)
        if not isinstance(value, kind):
            raise LitAdapterError(f"{path}: problem {pid}: field {name!r} must be {kind.__name__}, found {value!r}")
        return value

    choices = checked("choices", list)
    answer = checked("answer", int)
    if not choices or not 0 <= answer < len(choices):
        raise LitAdapterError(f"{path}: problem {pid}: answer {answer} is not an index of its {len(choices)} choices")
    return ScienceQAProblem(
        pid=pid,
        question=checked("question", str),
        choices=[str(c) for c in choices],
        answer=answer,
        hint=checked("hint", str, "") or "",
        image=raw.get("image") or None,
        subject=checked("subject", str),
        grade=checked("grade", str),
        split=str(raw.get("split") or ""),
        lecture=str(raw.get("lecture") or ""),
        solution=str(raw.get("solution") or ""),
    )


def training_segments(problem: ScienceQAProblem, style: PromptStyle, caption: Optional[str] = None):
    return style.training_segments(build_prompt(problem, caption), "", target_text(problem))


class ScienceQADataset(Dataset):
    """Tokenised ScienceQA problems for training (no cache: for small sets and direct use; the data module caches).

    Items: `input_ids`, `labels` and, with `image_dir` and `transform`, `image` [3,S,S] (zeros for a problem without
    an image) and `has_image`.
    """

    def __init__(
        self,
        problems: list[ScienceQAProblem],
        tokenizer: Tokenizer,
        prompt_style: str = "alpaca",
        max_seq_length: int = 512,
        captions: Optional[dict[str, str]] = None,
        image_dir: Optional[Path] = None,
        transform: Optional[Callable] = None,
    ) -> None:
        report = RecordReport("problems")
        encoded = encode_problems(problems, tokenizer, get_prompt_style(prompt_style), max_seq_length, report,
                                  captions, image_dir)  # fmt: skip
        loader = ProblemImageLoader(encoded.extras["image"], transform) if transform else None
        self.report = report
        self.inner = TokenizedDataset(encoded, range(len(encoded)), loader)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.inner[index]


def encode_problems(
    problems: list[ScienceQAProblem],
    tokenizer: Tokenizer,
    style: PromptStyle,
    max_seq_length: int,
    report: RecordReport,
    captions: Optional[dict[str, str]] = None,
    image_dir: Optional[Path] = None,
    gate: Optional[RecordGate] = None,
) -> EncodedSamples:
    builder = SampleBuilder(report, max_seq_length)
    for index, problem in enumerate(problems):
        image = image_path(problem, image_dir) if image_dir is not None else None
        if image is not None:
            try:
                check_image(image)
            except BadRecord as bad:
                if gate is None:
                    raise LitAdapterError(f"problem {problem.pid}: {bad.detail}") from None
                gate.reject(RawRecord(index), BadRecord(bad.reason, f"problem {problem.pid}: {bad.detail}"))
                continue
        segments = training_segments(problem, style, (captions or {}).get(problem.pid))
        builder.add(*encode_segments(tokenizer, segments), image=str(image) if image else "", pid=problem.pid)
    return builder.build()


class ProblemImageLoader:
    """Sample i's transformed image, or zeros (of the transform's output shape) for a problem without one;
    `has_image` tells which."""

    def __init__(self, paths: list[str], transform: Callable) -> None:
        self.paths = paths
        self.transform = transform
        self.blank: Optional[torch.Tensor] = None

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        path = self.paths[index]
        if path:
            return {"image": load_image(Path(path), self.transform), "has_image": torch.tensor(True)}
        if self.blank is None:
            from PIL import Image

            self.blank = torch.zeros_like(self.transform(Image.new("RGB", (8, 8))))
        return {"image": self.blank, "has_image": torch.tensor(False)}


class ScienceQADataModule(TokenizedDataModule):
    """ScienceQA training data: the official train split, validated on another official split.

    Args:
        data_dir: the folder with problems.json and pid_splits.json
        train_split: the split to train on
        val_split: the split to validate on (None: no validation)
        captions: captions.json ({"captions": {pid: text}}) whose text joins the hint as context
        image_dir: the official `images` folder (with train/val/test inside); given, batches add `images` (zeros
            for problems without an image) and `has_image`
        clip_model: the open_clip model whose image transform is used; under `lit-adapter fit` the visual encoder's
            (leave it out); None = ViT-L-14
        image_size: image side in pixels (None: the CLIP model's); under `lit-adapter fit` the visual encoder's
        settings: those of every data module (see `TokenizedDataModule`; on_bad_record applies to a problem whose
            image is missing or unreadable)
    """

    linked_settings = (*TokenizedDataModule.linked_settings, "clip_model", "image_size")

    def __init__(
        self,
        data_dir: Path,
        train_split: str = "train",
        val_split: Optional[str] = "val",
        captions: Optional[Path] = None,
        image_dir: Optional[Path] = None,
        clip_model: Optional[str] = None,
        image_size: Optional[int] = None,
        **settings: Any,
    ) -> None:
        super().__init__(data_dir, val_split=0, **settings)
        self.val_split = val_split
        self.data_dir = Path(data_dir)
        self.split_names = {"train": train_split, **({"val": val_split} if val_split else {})}
        self.captions_path = Path(captions) if captions is not None else None
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.clip_model = clip_model
        self.image_size = image_size

    @property
    def carries_images(self) -> bool:
        return self.image_dir is not None

    def splits(self) -> list[str]:
        return list(self.split_names)

    def split_files(self, split: str) -> list[Path]:
        files = [self.data_dir / PROBLEMS_FILE, self.data_dir / SPLITS_FILE]
        return files + ([self.captions_path] if self.captions_path is not None else [])

    def file_name(self, split: str) -> str:
        return f"{PROBLEMS_FILE}[{self.split_names[split]}]"

    def split_settings(self, split: str) -> dict:
        image_dir = str(self.image_dir.resolve()) if self.image_dir is not None else None
        return {"split": self.split_names[split], "image_dir": image_dir}

    def encode_split(self, split: str, tokenizer: Tokenizer, report: RecordReport) -> EncodedSamples:
        problems = load_problems(self.data_dir, self.split_names[split])
        captions = load_captions(self.captions_path) if self.captions_path is not None else None
        gate = RecordGate(self.data_dir / PROBLEMS_FILE, report, self.on_bad_record)
        return encode_problems(problems, tokenizer, self.style, self.max_seq_length, report, captions,
                               self.image_dir, gate)  # fmt: skip

    def extras_loader(self, encoded: EncodedSamples, train: bool) -> Optional[Callable[[int], dict]]:
        if self.image_dir is None:
            return None
        return ProblemImageLoader(encoded.extras["image"], self.image_transform(train))
