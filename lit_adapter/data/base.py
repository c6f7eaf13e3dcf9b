"""The machinery shared by the data modules: the model's settings, tokenise-once caching, seeded splits, loaders.

A module reads one or more *splits*: "all" (one file, divided into train/val with `val_split`) or "train" and "val"
(separately held-out data). `prepare_data` tokenises each split once and caches it on disk under a key made of the
data files' content, the tokenizer file and every setting that changes the tokens; `setup` loads the cache (and builds
it if `prepare_data` was not called).

The tokenizer, the context length, the image transform and the prompt style belong to the model being trained: under
`lit-adapter fit` they are set once, on the model, and handed to the data as `DataSettings` (`connect_model`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lit_adapter.data.batch import INSTRUCTION
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
from lit_adapter.prompts import ALPACA, PromptStyle, get_prompt_style
from lit_adapter.tokenizer import Tokenizer, tokenizer_files

# show a progress bar when a split has at least this many records
PROGRESS_MIN_RECORDS = 2000
# where each linked setting is set under `lit-adapter fit`
MODEL_KEYS = {
    "tokenizer_path": "the tokenizer of model.checkpoint_dir",
    "prompt_style": "model.adapter.prompt_style",
    "clip_model": "model.adapter.visual.clip_model",
    "image_size": "model.adapter.visual.image_size",
}


@dataclass(frozen=True)
class DataSettings:
    """What the data takes from the model it trains (`LitAdapterModule.data_settings`).

    tokenizer_path: the model's SentencePiece file
    max_seq_length: the model's context length (caps each data module's own max_seq_length)
    prompt_style: the adapter's prompt template (written into adapter_config.yaml, used by `generate`)
    clip_model, image_size: the image transform of the model's visual encoder; clip_model None = no visual encoder
    """

    tokenizer_path: str
    max_seq_length: int
    prompt_style: str = "alpaca"
    clip_model: Optional[str] = None
    image_size: Optional[int] = None


class TokenizedDataModule(LightningDataModule):
    """A LightningDataModule over tokenised samples; subclasses say what to read and how to encode it.

    Args (shared by every data module):
        data_path: the data file, or "builtin:demo" (the built-in demo data of this kind)
        tokenizer_path: the SentencePiece model; under `lit-adapter fit` the model's (leave it out)
        prompt_style: alpaca, alpaca_zh, chat or raw; under `lit-adapter fit` the adapter's (leave it out);
            None = alpaca
        max_seq_length: longer samples are cut to this many tokens (counted in a warning)
        batch_size: samples per batch, right-padded to the longest one
        val_split: validation part taken from data_path: a fraction in [0, 1) or a count (ignored for builtin:demo)
        seed: seed of the validation split and of the shuffling
        num_workers: data loader worker processes
        group_by_length: batch samples of similar length together (less padding)
        on_bad_record: "error" (stop at the first bad record) or "skip" (skip and count bad records)
        cache_dir: where tokenised data is cached (default: $LIT_ADAPTER_CACHE/tokenized or
            ~/.cache/lit-adapter/tokenized)
    """

    # the training data source this module's batches belong to (also: which built-in demo set "builtin:demo" means)
    source = INSTRUCTION
    # the settings that come from the model (see `connect_model`)
    linked_settings: tuple[str, ...] = ("tokenizer_path", "prompt_style")
    # the image transform (modules with images link these too)
    clip_model: Optional[str] = None
    image_size: Optional[int] = None

    def __init__(
        self,
        data_path: Union[str, Path],
        tokenizer_path: Optional[Union[str, Path]] = None,
        prompt_style: Optional[str] = None,
        max_seq_length: int = 512,
        batch_size: int = 4,
        val_split: Union[float, int] = 0.05,
        seed: int = 42,
        num_workers: int = 0,
        group_by_length: bool = False,
        on_bad_record: Literal["error", "skip"] = "error",
        cache_dir: Optional[Union[str, Path]] = None,
    ) -> None:
        super().__init__()
        self.data_path = str(data_path)
        self.is_builtin = is_builtin(self.data_path)
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else None
        self.prompt_style: Optional[PromptStyle] = get_prompt_style(prompt_style) if prompt_style else None
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
        # per split: "built" (tokenised now) or "cached" (read from the cache)
        self.cache_status: dict[str, str] = {}
        self._encoded: dict[str, EncodedSamples] = {}
        self._keys: dict[str, str] = {}

    # ---- what a concrete module provides ----

    @property
    def carries_images(self) -> bool:
        """Whether the batches hold images (the model then needs a visual encoder)."""
        return False

    @property
    def style(self) -> PromptStyle:
        """The prompt style in effect."""
        return self.prompt_style or ALPACA

    def splits(self) -> list[str]:
        """The splits to read: ["all"] (divided with val_split) or ["train"] / ["train", "val"]."""
        return ["train", "val"] if self.is_builtin else ["all"]

    def split_files(self, split: str) -> list[Path]:
        """The files whose content defines the split's samples (hashed into the cache key); the first names it."""
        if self.is_builtin:
            train, val = builtin_files(self.source)
            return [train if split == "train" else val]
        return [Path(self.data_path)]

    def split_settings(self, split: str) -> dict:
        """Settings besides the files that change the split's samples."""
        return {}

    def encode_split(self, split: str, tokenizer: Tokenizer, report: RecordReport) -> EncodedSamples:
        raise NotImplementedError

    def split_keys(self, encoded: EncodedSamples) -> Optional[list[str]]:
        """Samples sharing a key go to the same side of the train/val split (e.g. the captions of one image)."""
        return None

    def extras_loader(self, encoded: EncodedSamples, train: bool) -> Optional[Callable[[int], dict]]:
        return None

    def file_name(self, split: str) -> str:
        """How the split's records are named in its report."""
        return self.split_files(split)[0].name

    def image_transform(self, train: bool) -> Callable:
        """The CLIP image transform (clip_model and image_size of the model's visual encoder)."""
        from lit_adapter.adapters.visual import VisualConfig, image_transform

        clip_model = self.clip_model or VisualConfig.clip_model  # (the dataclass default)
        return image_transform(clip_model, train, self.image_size)

    # ---- Lightning hooks ----

    def connect(
        self, tokenizer_path: Union[str, Path], max_seq_length: Optional[int] = None, batch_size: Optional[int] = None
    ) -> None:
        """Link a tokenizer; `max_seq_length` (a model's context) caps this module's own length."""
        self.tokenizer_path = Path(tokenizer_path)
        if max_seq_length is not None:
            self.max_seq_length = min(self.max_seq_length, max_seq_length)
        if batch_size is not None:
            self.batch_size = batch_size

    def connect_model(self, settings: DataSettings, name: str) -> None:
        """Take the model's settings (`name`: this module's place in the config, e.g. "instruction"). A linked setting
        given to this module as well would be a second place for it, so it is refused."""
        values: dict[str, Any] = {
            "tokenizer_path": Path(settings.tokenizer_path),
            "prompt_style": get_prompt_style(settings.prompt_style),
            "clip_model": settings.clip_model,
            "image_size": settings.image_size,
        }
        for key in self.linked_settings:
            if getattr(self, key) is not None:
                raise LitAdapterError(
                    f"data.{name}.{key} is set, but it comes from the model ({MODEL_KEYS[key]}): drop it from the data"
                )
            setattr(self, key, values[key])
        self.connect(settings.tokenizer_path, settings.max_seq_length)

    def prepare_data(self) -> None:
        for split in self.splits():
            self._load_or_build(split)

    def setup(self, stage: Optional[str] = None) -> None:
        splits = self.splits()
        if "all" in splits:
            encoded = self._load_or_build("all")
            train, val = self._split(encoded)
            self.train_dataset = TokenizedDataset(encoded, train, self.extras_loader(encoded, train=True))
            self.val_dataset = TokenizedDataset(encoded, val, self.extras_loader(encoded, train=False))
            return
        encoded = self._load_or_build("train")
        self.train_dataset = TokenizedDataset(encoded, range(len(encoded)), self.extras_loader(encoded, train=True))
        if "val" in splits:
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
            collate_fn=partial(collate, source=self.source),
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
            collate_fn=partial(collate, source=self.source),
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
                f"{type(self).__name__}: no tokenizer; pass tokenizer_path, or the model's settings (connect_model)"
            )
        if not self.tokenizer_path.is_file():
            raise LitAdapterError(f"{self.tokenizer_path}: tokenizer file not found")
        return self.tokenizer_path

    def _settings(self, split: str) -> dict:
        return {
            "module": type(self).__name__,
            "split": split,
            "prompt_style": self.prompt_style.name if self.prompt_style is not None else None,
            "max_seq_length": self.max_seq_length,
            "on_bad_record": self.on_bad_record,
            **self.split_settings(split),
        }

    def _load_or_build(self, split: str) -> EncodedSamples:
        files = self.split_files(split)
        for path in files:
            if not path.is_file():
                raise LitAdapterError(f"{path}: data file not found")
        tokenizer_file = self._tokenizer_file()
        key = cache_key([*files, *tokenizer_files(tokenizer_file)], self._settings(split))
        if split in self._encoded and self._keys.get(split) == key:
            return self._encoded[split]
        cache = self.cache_dir / f"{files[0].stem}-{split}-{key[:20]}.pt"
        cached = load_encoded(cache, key)
        if cached is not None:
            encoded, report = cached
            self.cache_status[split] = "cached"
        else:
            report = RecordReport(self.file_name(split))
            encoded = self.encode_split(split, Tokenizer(tokenizer_file), report)
            if len(encoded) == 0:
                raise LitAdapterError(f"{files[0]}: no usable records ({report.summary()})")
            save_encoded(cache, key, encoded, report)
            self.cache_status[split] = "built"
        self._announce(report, cached is not None)
        self.reports[split] = report
        self._encoded[split] = encoded
        self._keys[split] = key
        return encoded

    def _announce(self, report: RecordReport, cached: bool) -> None:
        announce(report.summary() + (" (tokenised data from cache)" if cached else ""))
        if report.truncated:
            warnings.warn(
                f"{report.file_name}: {report.truncated} of {report.kept} samples were longer than "
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
