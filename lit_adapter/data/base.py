"""The machinery shared by the data modules: tokenizer linking, tokenise-once caching, seeded splits, loaders.

A module reads one or more *sources* (roles): "all" (one file, split into train/val with `val_split`) or "train"
and "val" (separately held-out data). `prepare_data` tokenises each source once and caches it on disk under a key
made of the data files' content, the tokenizer file and every setting that changes the tokens; `setup` loads the
cache (and builds it if `prepare_data` was not called).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lit_adapter.data.demo import builtin_files, cache_root, is_builtin
from lit_adapter.data.encoding import (
    EncodedSamples,
    LengthGroupedSampler,
    TokenizedDataset,
    cache_key,
    collate,
    load_encoded,
    save_encoded,
    split_groups,
)
from lit_adapter.data.records import RecordReport, announce, check_on_bad_record
from lit_adapter.errors import LitAdapterError
from lit_adapter.prompts import get_prompt_style
from lit_adapter.tokenizer import Tokenizer

# show a progress bar when a source has at least this many records
PROGRESS_MIN_RECORDS = 2000


class TokenizedDataModule(LightningDataModule):
    """A LightningDataModule over tokenised samples; subclasses say what to read and how to encode it."""

    # which built-in demo set data_path="builtin:demo" means ("instruction" or "caption")
    builtin_kind = "instruction"

    def __init__(
        self,
        data_path: Union[str, Path],
        tokenizer_path: Optional[Union[str, Path]],
        prompt_style: str,
        max_seq_length: int,
        batch_size: int,
        val_split: Union[float, int],
        seed: int,
        num_workers: int,
        group_by_length: bool,
        on_bad_record: str,
        cache_dir: Optional[Union[str, Path]],
    ) -> None:
        super().__init__()
        self.data_path = str(data_path)
        self.is_builtin = is_builtin(self.data_path)
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else None
        self.prompt_style = get_prompt_style(prompt_style)
        if max_seq_length < 2:
            raise LitAdapterError(f"max_seq_length={max_seq_length} must be at least 2 (BOS and one token)")
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.val_split = val_split
        self.seed = seed
        self.num_workers = num_workers
        self.group_by_length = group_by_length
        self.on_bad_record = check_on_bad_record(on_bad_record)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "tokenized"
        self.train_dataset: Optional[TokenizedDataset] = None
        self.val_dataset: Optional[TokenizedDataset] = None
        self.reports: dict[str, RecordReport] = {}
        # per role: "built" (tokenised now) or "cached" (read from the cache)
        self.cache_status: dict[str, str] = {}
        self._encoded: dict[str, EncodedSamples] = {}
        self._keys: dict[str, str] = {}

    # ---- what a concrete module provides ----

    def sources(self) -> list[str]:
        """The roles to read: ["all"] (split with val_split) or ["train"] / ["train", "val"]."""
        return ["train", "val"] if self.is_builtin else ["all"]

    def source_files(self, role: str) -> list[Path]:
        """The files whose content defines the role's samples (hashed into the cache key); the first names it."""
        if self.is_builtin:
            train, val = builtin_files(self.builtin_kind)
            return [train if role == "train" else val]
        return [Path(self.data_path)]

    def source_settings(self, role: str) -> dict:
        """Settings besides the files that change the role's samples."""
        return {}

    def encode_source(self, role: str, tokenizer: Tokenizer, report: RecordReport) -> EncodedSamples:
        raise NotImplementedError

    def split_keys(self, encoded: EncodedSamples) -> Optional[list[str]]:
        """Samples sharing a key go to the same side of the train/val split (e.g. the captions of one image)."""
        return None

    def extras_loader(self, encoded: EncodedSamples, train: bool) -> Optional[Callable[[int], dict]]:
        return None

    def source_name(self, role: str) -> str:
        return self.source_files(role)[0].name

    # ---- Lightning hooks ----

    def connect(
        self, tokenizer_path: Union[str, Path], max_seq_length: Optional[int] = None, batch_size: Optional[int] = None
    ) -> None:
        """Link the model's tokenizer; `max_seq_length` (the model's context) caps this module's own length."""
        self.tokenizer_path = Path(tokenizer_path)
        if max_seq_length is not None:
            self.max_seq_length = min(self.max_seq_length, max_seq_length)
        if batch_size is not None:
            self.batch_size = batch_size

    def prepare_data(self) -> None:
        for role in self.sources():
            self._load_or_build(role)

    def setup(self, stage: Optional[str] = None) -> None:
        roles = self.sources()
        if "all" in roles:
            encoded = self._load_or_build("all")
            train, val = self._split(encoded)
            self.train_dataset = TokenizedDataset(encoded, train, self.extras_loader(encoded, train=True))
            self.val_dataset = TokenizedDataset(encoded, val, self.extras_loader(encoded, train=False))
            return
        encoded = self._load_or_build("train")
        self.train_dataset = TokenizedDataset(encoded, range(len(encoded)), self.extras_loader(encoded, train=True))
        if "val" in roles:
            encoded = self._load_or_build("val")
            self.val_dataset = TokenizedDataset(encoded, range(len(encoded)), self.extras_loader(encoded, train=False))

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_dataset)
        sampler = LengthGroupedSampler(dataset.lengths(), self.batch_size, self.seed) if self.group_by_length else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> Union[DataLoader, list]:
        self._require(self.train_dataset)
        if self.val_dataset is None or len(self.val_dataset) == 0:
            return []
        return DataLoader(
            self.val_dataset,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    # ---- internals ----

    def _require(self, dataset: Optional[TokenizedDataset]) -> TokenizedDataset:
        if self.train_dataset is None:
            self.setup()
        return dataset if dataset is not None else self.train_dataset

    def _tokenizer_file(self) -> Path:
        if self.tokenizer_path is None:
            raise LitAdapterError(
                f"{type(self).__name__}: no tokenizer; pass tokenizer_path or let the trainer connect() the model's"
            )
        if not self.tokenizer_path.is_file():
            raise LitAdapterError(f"{self.tokenizer_path}: tokenizer file not found")
        return self.tokenizer_path

    def _settings(self, role: str) -> dict:
        return {
            "module": type(self).__name__,
            "role": role,
            "prompt_style": self.prompt_style.name,
            "max_seq_length": self.max_seq_length,
            "on_bad_record": self.on_bad_record,
            **self.source_settings(role),
        }

    def _load_or_build(self, role: str) -> EncodedSamples:
        files = self.source_files(role)
        for path in files:
            if not path.is_file():
                raise LitAdapterError(f"{path}: data file not found")
        tokenizer_file = self._tokenizer_file()
        key = cache_key([*files, tokenizer_file], self._settings(role))
        if role in self._encoded and self._keys.get(role) == key:
            return self._encoded[role]
        cache = self.cache_dir / f"{files[0].stem}-{role}-{key[:20]}.pt"
        cached = load_encoded(cache, key)
        if cached is not None:
            encoded, report = cached
            self.cache_status[role] = "cached"
        else:
            report = RecordReport(self.source_name(role))
            encoded = self.encode_source(role, Tokenizer(tokenizer_file), report)
            if len(encoded) == 0:
                raise LitAdapterError(f"{files[0]}: no usable records ({report.summary()})")
            save_encoded(cache, key, encoded, report)
            self.cache_status[role] = "built"
        self._announce(report, cached is not None)
        self.reports[role] = report
        self._encoded[role] = encoded
        self._keys[role] = key
        return encoded

    def _announce(self, report: RecordReport, cached: bool) -> None:
        announce(report.summary() + (" (tokenised data from cache)" if cached else ""))
        if report.truncated:
            warnings.warn(
                f"{report.source}: {report.truncated} of {report.kept} samples were longer than "
                f"max_seq_length={report.max_seq_length} and were truncated",
                stacklevel=3,
            )

    def _split(self, encoded: EncodedSamples) -> tuple[list[int], list[int]]:
        keys = self.split_keys(encoded)
        if keys is None:
            return split_groups(len(encoded), self.val_split, self.seed)
        unique = sorted(set(keys))
        _, val_groups = split_groups(len(unique), self.val_split, self.seed)
        val_keys = {unique[i] for i in val_groups}
        train = [i for i, key in enumerate(keys) if key not in val_keys]
        val = [i for i, key in enumerate(keys) if key in val_keys]
        return train, val
