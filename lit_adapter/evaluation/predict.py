"""Answering ScienceQA problems with a model: greedy generation, or ranking the options by likelihood.

Prompts are built exactly as for training (`lit_adapter.data.scienceqa`: the problem text as the instruction of the
adapter's prompt style); likelihood mode tokenizes prompt + answer sentence as one text, like the training samples.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from lit_adapter.data.encoding import encode_segments
from lit_adapter.data.scienceqa import ScienceQAProblem, build_prompt, image_path, training_segments
from lit_adapter.errors import LitAdapterError
from lit_adapter.evaluation.results import prediction_record
from lit_adapter.evaluation.scienceqa import parse_answer
from lit_adapter.inference.engine import Decoding, Engine
from lit_adapter.prompts import OPTION_LETTERS


class ScienceQAPredictor:
    """Answers problems through an `Engine` (its tokenizer, prompt style and visual encoder, and its decoding);
    each call takes one batch of problems.

    `image_dir` is the official `images` folder (`<split>/<pid>/image.png`) or one split's folder
    (`<pid>/image.png`); without it every problem is answered from its text.
    """

    def __init__(
        self, engine: Engine, captions: Optional[dict[str, str]] = None, image_dir: Optional[Path] = None
    ) -> None:
        if image_dir is not None and not Path(image_dir).is_dir():
            raise LitAdapterError(f"{image_dir}: image folder not found (expected <pid>/image.png inside)")
        self.engine = engine
        self.captions = captions or {}
        self.image_dir = None if image_dir is None else Path(image_dir)
        self.max_len = engine.context_length

    def prompt_text(self, problem: ScienceQAProblem) -> str:
        return self.engine.format(build_prompt(problem, self.captions.get(problem.pid)))

    def fit_context(self, ids: list[int], room: int, pid: str) -> tuple[list[int], bool]:
        """Drops the prompt's oldest tokens (the first kept: BOS, or a template's own start token) so that `room`
        more tokens fit the context; says if it did."""
        limit = self.max_len - room
        if len(ids) <= limit:
            return ids, False
        if limit < 2:
            raise LitAdapterError(f"problem {pid}: the model's context ({self.max_len} tokens) leaves no room")
        return ids[:1] + ids[len(ids) - limit + 1:], True

    def by_image(self, problems: Sequence[ScienceQAProblem]) -> list[list[ScienceQAProblem]]:
        """Splits a batch into problems with an image and problems without (each part gets one visual prompt or
        none)."""
        if self.image_dir is None:
            return [list(problems)]
        parts = [[p for p in problems if p.image], [p for p in problems if not p.image]]
        return [part for part in parts if part]

    @staticmethod
    def in_order(problems: Sequence[ScienceQAProblem], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records in the order of `problems` (the image/no-image split reorders them)."""
        by_pid = {record["pid"]: record for record in records}
        return [by_pid[problem.pid] for problem in problems]

    def visual_tokens(self, part: Sequence[ScienceQAProblem]) -> Optional[torch.Tensor]:
        """[len(part), tokens, dim] for a part whose problems have images, else None."""
        if self.image_dir is None or not part[0].image:
            return None
        return self.engine.visual_tokens([image_path(problem, self.image_dir) for problem in part])

    def generate(self, problems: Sequence[ScienceQAProblem], max_new_tokens: int) -> list[dict[str, Any]]:
        """Greedy answers, decoded together as one left-padded batch (per image/no-image part)."""
        decoding = Decoding(max_new_tokens=max_new_tokens, stop=self.engine.style.stop_sequences)
        records = []
        for part in self.by_image(problems):
            prompts, truncated = [], []
            for problem in part:
                ids = self.engine.prompt_ids(self.prompt_text(problem))  # BOS unless the template writes it
                ids, cut = self.fit_context(ids, max_new_tokens, problem.pid)
                prompts.append(torch.tensor(ids, device=self.engine.device))
                truncated.append(cut)
            outputs = self.engine.generate_batch(prompts, decoding, self.visual_tokens(part))
            for problem, tokens, cut in zip(part, outputs, truncated, strict=True):
                text = self.engine.text(tokens, decoding)
                choice = parse_answer(text, len(problem.choices))
                records.append(prediction_record(problem.pid, text, choice, problem.answer, truncated=cut))
        return self.in_order(problems, records)

    def likelihood(self, problems: Sequence[ScienceQAProblem]) -> list[dict[str, Any]]:
        """Picks the option whose answer sentence ("The answer is (X).") has the highest summed log-likelihood after
        the prompt; every option of every problem in the batch goes through one forward pass."""
        records = []
        for part in self.by_image(problems):
            rows, spans, owners, truncated = [], [], [], []
            for index, problem in enumerate(part):
                candidates, candidate_spans, cut = self.candidate_ids(problem)
                rows += candidates
                spans += candidate_spans
                owners += [index] * len(candidates)
                truncated.append(cut)
            visual = self.visual_tokens(part)
            if visual is not None:  # one visual prompt per candidate row: its problem's
                visual = visual[torch.tensor(owners, device=visual.device)]
            scores = self.engine.score(rows, spans, visual)
            for index, problem in enumerate(part):
                option_scores = [score for score, owner in zip(scores, owners, strict=True) if owner == index]
                choice = max(range(len(option_scores)), key=option_scores.__getitem__)
                records.append(prediction_record(
                    problem.pid, f"The answer is ({OPTION_LETTERS[choice]}).", choice, problem.answer,
                    scores=[round(score, 4) for score in option_scores], truncated=truncated[index],
                ))
        return self.in_order(problems, records)

    def candidate_ids(self, problem: ScienceQAProblem) -> tuple[list[list[int]], list[tuple[int, int]], bool]:
        """For each option, the training sample's token ids with that option as the answer, and the span [start,
        end) of the answer sentence (the supervised tokens but the closing EOS)."""
        caption = self.captions.get(problem.pid)
        rows, spans = [], []
        for choice in range(len(problem.choices)):
            segments = training_segments(dataclasses.replace(problem, answer=choice), self.engine.style, caption)
            ids, supervised = encode_segments(self.engine.tokenizer, segments,
                                             special=self.engine.style.adds_special_tokens)
            start = supervised.index(True)
            rows.append(ids[:-1])  # without EOS
            spans.append((start, len(ids) - 1))
        overflow = max(len(ids) for ids in rows) - self.max_len
        if overflow <= 0:
            return rows, spans, False
        if min(start for start, _ in spans) - overflow < 2:
            raise LitAdapterError(f"problem {problem.pid}: the answer sentences alone exceed the model's context")
        rows = [ids[:1] + ids[1 + overflow:] for ids in rows]
        return rows, [(start - overflow, end - overflow) for start, end in spans], True
