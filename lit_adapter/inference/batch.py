"""Batch generation from a JSONL file: {"prompt": ..., "input": ..., "image": ...} per line -> results JSONL."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from lit_adapter.errors import LitAdapterError
from lit_adapter.inference.engine import Decoding, Engine, ExpertSlot, build_prompt
from lit_adapter.inference.experts import Expert


@dataclass
class PromptRecord:
    line: int
    prompt: str
    input: str = ""
    image: Optional[Path] = None


def read_prompts(path: Path) -> list[PromptRecord]:
    """Records of a JSONL prompts file; a relative image path is read from the file's folder when it exists there."""
    path = Path(path)
    if not path.is_file():
        raise LitAdapterError(f"{path}: prompts file not found")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            records.append(parse_record(line, f"{path}:{number}", number, path.parent))
    if not records:
        raise LitAdapterError(f"{path}: no prompts (expected one JSON object per line)")
    return records


def parse_record(line: str, where: str, number: int, base_dir: Path) -> PromptRecord:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as err:
        raise LitAdapterError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
        raise LitAdapterError(f'{where}: expected an object with a "prompt" string')
    for key in ("input", "image"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise LitAdapterError(f"{where}: {key!r} must be a string")
    image = Path(data["image"]) if data.get("image") else None
    if image is not None and not image.is_absolute() and (base_dir / image).exists():
        image = base_dir / image
    return PromptRecord(number, data["prompt"], data.get("input") or "", image)


def generate_records(
    engine: Engine,
    records: Sequence[PromptRecord],
    decoding: Decoding,
    batch_size: int = 8,
    expert: Optional[Expert] = None,
    expert_slot: ExpertSlot = "input",
    generator: Optional[torch.Generator] = None,
    where: str = "prompts file",
) -> list[dict[str, Any]]:
    """One result per record, in order: the record's fields plus "output", "prompt_tokens", "new_tokens".

    Records are decoded in batches of similar prompt length; a batch holds only records with an image or only
    records without one when the model sees pixels (visual prompts are per row).
    """
    if batch_size < 1:
        raise LitAdapterError(f"--batch_size {batch_size}: must be at least 1")
    prompts = [prompt_ids(engine, record, expert, expert_slot, where) for record in records]
    results: list[Optional[dict[str, Any]]] = [None] * len(records)
    with tqdm(total=len(records), desc="generating", unit="prompt", file=sys.stderr, disable=None) as progress:
        for chunk in batches(engine, records, prompts, batch_size):
            chunk_records, chunk_prompts = [records[i] for i in chunk], [prompts[i] for i in chunk]
            outputs = decode_chunk(engine, chunk_records, chunk_prompts, decoding, generator)
            for index, (text, tokens) in zip(chunk, outputs, strict=True):
                results[index] = result_row(records[index], text, prompts[index].numel(), tokens)
            progress.update(len(chunk))
    return results  # type: ignore[return-value]


def prompt_ids(
    engine: Engine, record: PromptRecord, expert: Optional[Expert], slot: ExpertSlot, where: str
) -> torch.Tensor:
    try:
        text = build_prompt(engine, record.prompt, record.input, record.image, expert, slot)
    except LitAdapterError as err:
        raise LitAdapterError(f"{where}:{record.line}: {err}") from None
    ids = engine.encode(text)
    if ids.numel() >= engine.context_length:
        raise LitAdapterError(
            f"{where}:{record.line}: prompt is {ids.numel()} tokens, the model's context is {engine.context_length}: "
            "shorten it"
        )
    return ids


def batches(
    engine: Engine, records: Sequence[PromptRecord], prompts: Sequence[torch.Tensor], batch_size: int
) -> list[list[int]]:
    """Record indices grouped by (image or not, when the model sees pixels), sorted by length, chunked."""
    def group(i: int) -> bool:
        return engine.multimodal and records[i].image is not None

    order = sorted(range(len(records)), key=lambda i: (group(i), prompts[i].numel()))
    chunks: list[list[int]] = []
    for i in order:
        if chunks and len(chunks[-1]) < batch_size and group(chunks[-1][0]) == group(i):
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def decode_chunk(
    engine: Engine,
    records: Sequence[PromptRecord],
    prompts: Sequence[torch.Tensor],
    decoding: Decoding,
    generator: Optional[torch.Generator],
) -> list[tuple[str, int]]:
    """(text, new token count) per record, decoded together; images become visual tokens when all have one."""
    images = [r.image for r in records] if all(r.image is not None for r in records) else []
    outputs = engine.generate_batch(prompts, decoding, engine.visual_tokens(images), generator=generator)
    return [(engine.text(tokens, decoding), len(tokens)) for tokens in outputs]


def result_row(record: PromptRecord, text: str, prompt_tokens: int, new_tokens: int) -> dict:
    row: dict[str, Any] = {"prompt": record.prompt}
    if record.input:
        row["input"] = record.input
    if record.image is not None:
        row["image"] = str(record.image)
    row.update(output=text, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    return row
