"""Answering ScienceQA problems with a model: greedy generation, or ranking the options by likelihood.

Prompts are built exactly as for training (`lit_adapter.data.scienceqa`: the problem text as the instruction of the
adapter's prompt style); likelihood mode tokenizes prompt + answer sentence as one text, like the training samples.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from lit_adapter.data.encoding import encode_segments
from lit_adapter.data.scienceqa import ScienceQAProblem, build_prompt, image_path, training_segments
from lit_adapter.errors import LitAdapterError
from lit_adapter.evaluation.results import prediction_record
from lit_adapter.evaluation.scienceqa import OPTION_LETTERS, parse_answer
from lit_adapter.images import load_image
from lit_adapter.inference.generate import generate_batch
from lit_adapter.inference.stream import cut_at_stop
from lit_adapter.prompts import get_prompt_style
from lit_adapter.tokenizer import Tokenizer


class ImageLoader:
    """Problem images from the official `images` folder (`<split>/<pid>/image.png`) or one split's folder
    (`<pid>/image.png`), CLIP-transformed."""

    def __init__(self, image_dir: Path, transform: Callable) -> None:
        if not image_dir.is_dir():
            raise LitAdapterError(f"{image_dir}: image folder not found (expected <pid>/image.png inside)")
        self.image_dir = image_dir
        self.transform = transform

    def __call__(self, problem: ScienceQAProblem) -> torch.Tensor:
        return load_image(image_path(problem, self.image_dir), self.transform)


class ScienceQAPredictor:
    """Answers problems with an `AdapterModel` (`load_adapter_model`); each call takes one batch of problems."""

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        prompt_style: str,
        device: torch.device,
        captions: Optional[dict[str, str]] = None,
        images: Optional[ImageLoader] = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.style = get_prompt_style(prompt_style)
        self.device = device
        self.captions = captions or {}
        self.images = images
        self.max_len = model.llama.config.max_seq_len

    def prompt_text(self, problem: ScienceQAProblem) -> str:
        return self.style.apply(build_prompt(problem, self.captions.get(problem.pid)))

    def fit_context(self, ids: list[int], room: int, pid: str) -> tuple[list[int], bool]:
        """Drops the prompt's oldest tokens (BOS kept) so that `room` more tokens fit the context; says if it did."""
        limit = self.max_len - room
        if len(ids) <= limit:
            return ids, False
        if limit < 2:
            raise LitAdapterError(f"problem {pid}: the model's context ({self.max_len} tokens) leaves no room")
        return ids[:1] + ids[len(ids) - limit + 1:], True

    def by_image(self, problems: Sequence[ScienceQAProblem]) -> list[list[ScienceQAProblem]]:
        """Splits a batch into problems with an image and problems without (each part gets one visual prompt or
        none)."""
        if self.images is None:
            return [list(problems)]
        parts = [[p for p in problems if p.image], [p for p in problems if not p.image]]
        return [part for part in parts if part]

    @staticmethod
    def in_order(problems: Sequence[ScienceQAProblem], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records in the order of `problems` (the image/no-image split reorders them)."""
        by_pid = {record["pid"]: record for record in records}
        return [by_pid[problem.pid] for problem in problems]

    def visual_tokens(self, part: Sequence[ScienceQAProblem]) -> Optional[torch.Tensor]:
        if self.images is None or not part[0].image:
            return None
        return self.model.encode_images(torch.stack([self.images(p) for p in part]).to(self.device))

    @torch.inference_mode()
    def generate(self, problems: Sequence[ScienceQAProblem], max_new_tokens: int) -> list[dict[str, Any]]:
        """Greedy answers, decoded together as one left-padded batch (per image/no-image part)."""
        records = []
        for part in self.by_image(problems):
            prompts, truncated = [], []
            for problem in part:
                ids = self.tokenizer.encode(self.prompt_text(problem), bos=True)
                ids, cut = self.fit_context(ids, max_new_tokens, problem.pid)
                prompts.append(torch.tensor(ids, device=self.device))
                truncated.append(cut)
            outputs = generate_batch(
                self.model.llama, prompts, max_new_tokens, eos_id=self.tokenizer.eos_id,
                visual_tokens=self.visual_tokens(part), should_stop=self.reached_stop_sequence,
            )
            for problem, tokens, cut in zip(part, outputs, truncated, strict=True):
                text, _ = cut_at_stop(self.tokenizer.decode(tokens), self.style.stop_sequences)
                choice = parse_answer(text, len(problem.choices))
                records.append(prediction_record(problem.pid, text, choice, problem.answer, truncated=cut))
        return self.in_order(problems, records)

    def reached_stop_sequence(self, row: int, tokens: list[int]) -> bool:
        return bool(self.style.stop_sequences) and cut_at_stop(self.tokenizer.decode(tokens),
                                                               self.style.stop_sequences)[1]

    @torch.inference_mode()
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
            scores = self.sequence_scores(rows, spans, owners, self.visual_tokens(part))
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
            segments = training_segments(dataclasses.replace(problem, answer=choice), self.style, caption)
            ids, supervised = encode_segments(self.tokenizer, segments)
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

    def sequence_scores(
        self, rows: list[list[int]], spans: list[tuple[int, int]], owners: list[int], visual: Optional[torch.Tensor]
    ) -> list[float]:
        """Summed log-probability of tokens [start, end) of each row; all rows in one right-padded forward."""
        width = max(len(ids) for ids in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        scored = torch.zeros(len(rows), width - 1, dtype=torch.bool, device=self.device)
        for row, (ids, (start, end)) in enumerate(zip(rows, spans, strict=True)):
            tokens[row, : len(ids)] = torch.tensor(ids, device=self.device)
            scored[row, start - 1: end - 1] = True  # the logits at t predict token t + 1
        prefix = None if visual is None else visual[torch.tensor(owners, device=self.device)]
        logits = self.model.llama(tokens, visual_tokens=prefix)[:, :-1].float()
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        return torch.where(scored, log_probs, 0.0).sum(dim=-1).tolist()
