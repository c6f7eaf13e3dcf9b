"""Tokenised samples: segment masking, truncation, the on-disk cache, datasets, padding collate, length grouping.

Labels follow the usual causal-LM convention: `labels` is aligned with `input_ids` (the model shifts), -100 where
no loss is taken (the prompt, BOS and padding); the response tokens and the closing EOS are supervised.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset, Sampler

from lit_adapter.data.batch import IGNORE_INDEX, INSTRUCTION, TrainingBatch
from lit_adapter.data.records import RecordReport
from lit_adapter.errors import LitAdapterError
from lit_adapter.files import atomic_path
from lit_adapter.prompts import Segment
from lit_adapter.tokenizer import Tokenizer

PAD_ID = 0
CACHE_FORMAT = 2  # 2: the record report names its file under `file_name`
NO_RESPONSE_LEFT = "no response token within max_seq_length"


def encode_segments(
    tokenizer: Tokenizer, segments: Sequence[Segment], special: bool = True
) -> tuple[list[int], list[bool]]:
    """BOS + the tokens of the joined text + EOS, and for each token whether it carries the loss.

    The text is tokenised as a whole (as the official recipe does: prompt + response encoded together), and each
    token is attributed to the segment where it starts, using the tokenizer's character offsets. `special` False
    adds neither BOS nor EOS: a chat template's text carries its own (and its end-of-turn tokens are supervised
    with the reply they end).
    """
    ends, position = [], 0
    for text, _ in segments:
        position += len(text)
        ends.append(position)
    token_ids, starts = tokenizer.encode_with_offsets("".join(text for text, _ in segments))
    ids, supervised = [], []
    if special and tokenizer.bos_id is not None:
        ids, supervised = [tokenizer.bos_id], [False]
    for token, start in zip(token_ids, starts, strict=True):
        segment = min(bisect_right(ends, start), len(segments) - 1)
        ids.append(token)
        supervised.append(segments[segment][1])
    if special and tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
        supervised.append(True)
    return ids, supervised


@dataclass
class EncodedSamples:
    """All samples of one file, stored flat: sample i is `input_ids[offsets[i]:offsets[i+1]]`."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    offsets: torch.Tensor
    extras: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        ids = self.input_ids[start:end].long()
        labels = ids.masked_fill(~self.loss_mask[start:end], IGNORE_INDEX)
        return ids, labels

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


class SampleBuilder:
    """Collects encoded samples, truncating to `max_seq_length`; counts truncations and samples left without any
    supervised token (dropped, since they would add nothing but a zero-weight row)."""

    def __init__(self, report: RecordReport, max_seq_length: int) -> None:
        self.report = report
        self.max_seq_length = max_seq_length
        report.max_seq_length = max_seq_length
        self.ids: list[int] = []
        self.mask: list[bool] = []
        self.offsets = [0]
        self.extras: dict[str, list] = {}

    def add(self, ids: list[int], supervised: list[bool], **extras: Any) -> None:
        if len(ids) > self.max_seq_length:
            ids, supervised = ids[: self.max_seq_length], supervised[: self.max_seq_length]
            if not any(supervised):
                self.report.skip(NO_RESPONSE_LEFT)
                return
            self.report.truncated += 1
        self.ids += ids
        self.mask += supervised
        self.offsets.append(len(self.ids))
        for key, value in extras.items():
            self.extras.setdefault(key, []).append(value)
        self.report.kept += 1

    def build(self) -> EncodedSamples:
        return EncodedSamples(
            input_ids=torch.tensor(self.ids, dtype=torch.int32),
            loss_mask=torch.tensor(self.mask, dtype=torch.bool),
            offsets=torch.tensor(self.offsets, dtype=torch.int64),
            extras=self.extras,
        )


def file_digest(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(files: Sequence[Path], settings: dict) -> str:
    """A hash of the files' content (data and tokenizer) and of every setting that changes the tokens."""
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **settings}, sort_keys=True).encode())
    for path in files:
        digest.update(file_digest(path).encode())
    return digest.hexdigest()


def save_encoded(path: Path, key: str, encoded: EncodedSamples, report: RecordReport) -> None:
    payload = {
        "key": key,
        "input_ids": encoded.input_ids,
        "loss_mask": encoded.loss_mask,
        "offsets": encoded.offsets,
        "extras": encoded.extras,
        "report": report.to_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_encoded(path: Path, key: str) -> Optional[tuple[EncodedSamples, RecordReport]]:
    """The cached samples, or None when there is no usable cache for this key."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache file is rebuilt, not trusted
        return None
    if not isinstance(payload, dict) or payload.get("key") != key:
        return None
    encoded = EncodedSamples(payload["input_ids"], payload["loss_mask"], payload["offsets"], payload["extras"])
    return encoded, RecordReport.from_dict(payload["report"])


class TokenizedDataset(Dataset):
    """The samples at `indices`; `load_extras(index)` adds per-sample entries (e.g. the transformed image)."""

    def __init__(
        self,
        encoded: EncodedSamples,
        indices: Sequence[int],
        load_extras: Optional[Callable[[int], dict[str, torch.Tensor]]] = None,
    ) -> None:
        self.encoded = encoded
        self.indices = list(indices)
        self.load_extras = load_extras

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        index = self.indices[position]
        ids, labels = self.encoded.sample(index)
        item = {"input_ids": ids, "labels": labels}
        if self.load_extras is not None:
            item.update(self.load_extras(index))
        return item

    def lengths(self) -> list[int]:
        all_lengths = self.encoded.lengths()
        return [int(all_lengths[i]) for i in self.indices]


def collate(samples: list[dict[str, torch.Tensor]], source: str = INSTRUCTION) -> TrainingBatch:
    """Right-pads to the longest sample: `input_ids` with 0, `labels` with -100; `attention_mask` marks real tokens;
    the samples' `image` entries are stacked into `images`, their `has_image` flags into `has_image`."""
    longest = max(sample["input_ids"].numel() for sample in samples)
    batch_size = len(samples)
    input_ids = torch.full((batch_size, longest), PAD_ID, dtype=torch.long)
    labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
    for row, sample in enumerate(samples):
        length = sample["input_ids"].numel()
        input_ids[row, :length] = sample["input_ids"]
        labels[row, :length] = sample["labels"]
        attention_mask[row, :length] = 1
    batch = TrainingBatch(input_ids=input_ids, labels=labels, attention_mask=attention_mask, source=source)
    if "image" in samples[0]:
        batch["images"] = torch.stack([sample["image"] for sample in samples])
    if "has_image" in samples[0]:
        batch["has_image"] = torch.stack([sample["has_image"] for sample in samples])
    return batch


class LengthGroupedSampler(Sampler[int]):
    """Shuffled order in which neighbours have similar lengths, so padded batches waste little: the shuffled indices
    are cut into mega-batches of `mega_batches` batches, each sorted by length (longest first), and the resulting
    batches are shuffled. Deterministic for a given seed and epoch (`set_epoch`)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 42, mega_batches: int = 50) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_size = batch_size * mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), self.mega_size):
            mega = sorted(order[start : start + self.mega_size], key=lambda i: -self.lengths[i])
            batches += [mega[i : i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
        for batch in torch.randperm(len(batches), generator=generator).tolist():
            yield from batches[batch]


def split_groups(groups: int, val_split: Union[int, float], seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of `groups` items into (train, val): `val_split` is a fraction in [0, 1) or a count."""
    n_val = validation_count(groups, val_split)
    order = torch.randperm(groups, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def validation_count(groups: int, val_split: Union[int, float]) -> int:
    if isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or val_split < 0:
        raise LitAdapterError(f"val_split={val_split!r} must be a fraction in [0, 1) or a count of examples")
    if val_split < 1:
        n_val = max(1, round(groups * val_split)) if val_split > 0 else 0
    elif float(val_split).is_integer():
        n_val = int(val_split)
    else:
        raise LitAdapterError(f"val_split={val_split} must be a fraction in [0, 1) or a whole count of examples")
    if n_val >= groups:
        raise LitAdapterError(
            f"val_split={val_split} leaves no training examples out of {groups}; use a smaller validation part"
        )
    return n_val
