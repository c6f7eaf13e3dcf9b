"""Batch generation from a JSONL file: {"prompt": ..., "input": ..., "image": ...} per line -> results JSONL.

With an ImageBind-LLM adapter a record may also carry "video", "audio", "depth", "thermal", "imu" and "point", each
PATH or PATH:WEIGHT as on the command line; its inputs are mixed by weight into the record's visual token."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from lit_adapter.errors import LitAdapterError
from lit_adapter.inference.engine import Decoding, Engine, ExpertSlot, build_prompt
from lit_adapter.inference.experts import Expert
from lit_adapter.media import INPUT_KINDS

BIND_ONLY = tuple(kind for kind in INPUT_KINDS if kind != "image")  # the inputs only ImageBind-LLM takes


@dataclass
class PromptRecord:
    line: int
    prompt: str
    input: str = ""
    image: Optional[Path] = None
    media: dict[str, str] = field(default_factory=dict)  # kind -> PATH[:WEIGHT], for ImageBind-LLM

    def bind_inputs(self) -> dict[str, str]:
        """Every input of the record as ImageBind-LLM takes it (the image included)."""
        return ({"image": str(self.image)} if self.image is not None else {}) | self.media


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
    for key in ("input", *INPUT_KINDS):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise LitAdapterError(f"{where}: {key!r} must be a string")
    image = beside(Path(data["image"]), base_dir) if data.get("image") else None
    media = {kind: str(beside(Path(data[kind]), base_dir)) for kind in BIND_ONLY if data.get(kind)}
    return PromptRecord(number, data["prompt"], data.get("input") or "", image, media)


def beside(path: Path, base_dir: Path) -> Path:
    """A relative path as found in the prompts file's folder, else as given (relative to the working directory);
    a trailing `:WEIGHT` stays on the path it came with."""
    if path.is_absolute():
        return path
    file, sep, weight = str(path).rpartition(":")
    for candidate in (path, Path(file)) if sep and file else (path,):
        if (base_dir / candidate).exists():
            return base_dir / path
    return path


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
    check_inputs(engine, records, where)
    prompts = [prompt_ids(engine, record, expert, expert_slot, where) for record in records]
    results: list[Optional[dict[str, Any]]] = [None] * len(records)
    with tqdm(total=len(records), desc="generating", unit="prompt", file=sys.stderr, disable=None) as progress:
        for chunk in batches(engine, records, prompts, batch_size):
            chunk_records, chunk_prompts = [records[i] for i in chunk], [prompts[i] for i in chunk]
            outputs = decode_chunk(engine, chunk_records, chunk_prompts, decoding, generator, where)
            for index, (text, tokens) in zip(chunk, outputs, strict=True):
                results[index] = result_row(records[index], text, prompts[index].numel(), tokens)
            progress.update(len(chunk))
    return results  # type: ignore[return-value]


def check_inputs(engine: Engine, records: Sequence[PromptRecord], where: str) -> None:
    """Refuse, before decoding anything, a record input the model cannot take."""
    from lit_adapter.media.inputs import bind_visual

    for record in records:
        if record.media:
            bind_visual(engine.adapter_model, f"{where}:{record.line}: {next(iter(record.media))!r}")


def has_visual_input(engine: Engine, record: PromptRecord) -> bool:
    """Whether the record's prompt gets a visual token (batches keep such records apart from the others)."""
    if engine.binds:
        return bool(record.bind_inputs())
    return engine.multimodal and record.image is not None


def prompt_ids(
    engine: Engine, record: PromptRecord, expert: Optional[Expert], slot: ExpertSlot, where: str
) -> torch.Tensor:
    image = None if engine.binds else record.image  # ImageBind-LLM sees the image through its encoder
    try:
        text = build_prompt(engine, record.prompt, record.input, image, expert, slot)
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
    """Record indices grouped by (visual input or not, when the model sees one), sorted by length, chunked."""
    def group(i: int) -> bool:
        return has_visual_input(engine, records[i])

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
    where: str = "prompts file",
) -> list[tuple[str, int]]:
    """(text, new token count) per record, decoded together; a chunk's records all have a visual input or none."""
    outputs = engine.generate_batch(prompts, decoding, chunk_visual_tokens(engine, records, where),
                                    generator=generator)
    return [(engine.text(tokens, decoding), len(tokens)) for tokens in outputs]


def chunk_visual_tokens(engine: Engine, records: Sequence[PromptRecord], where: str) -> Optional[torch.Tensor]:
    """One row of visual tokens per record: images through the visual encoder, or ImageBind-LLM's mixed inputs."""
    if not all(has_visual_input(engine, record) for record in records):
        return None
    if not engine.binds:
        return engine.visual_tokens([record.image for record in records])
    from lit_adapter.media.inputs import bind_tokens

    rows = []
    for record in records:
        try:
            rows.append(bind_tokens(engine.adapter_model, record.bind_inputs(), engine.device))
        except LitAdapterError as err:
            raise LitAdapterError(f"{where}:{record.line}: {err}") from None
    return torch.cat(rows)


def result_row(record: PromptRecord, text: str, prompt_tokens: int, new_tokens: int) -> dict:
    row: dict[str, Any] = {"prompt": record.prompt}
    if record.input:
        row["input"] = record.input
    if record.image is not None:
        row["image"] = str(record.image)
    row.update(record.media)
    row.update(output=text, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    return row
