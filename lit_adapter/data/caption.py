"""Image-caption data (the V2 visual pre-training): COCO caption annotations or JSON Lines, with images.

The prompt is the instruction "Generate caption of this image" in the chosen prompt style (alpaca by default, as
in the official recipe) and the caption is the response. Every image is checked while preparing (missing or
unreadable -> error, or skip and count), so a bad file never stops training halfway. Batches add `images`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from tqdm import tqdm

from lit_adapter.data.base import PROGRESS_MIN_RECORDS, TokenizedDataModule
from lit_adapter.data.batch import CAPTION
from lit_adapter.data.encoding import EncodedSamples, SampleBuilder, encode_segments
from lit_adapter.data.records import (
    BadRecord,
    RawRecord,
    RecordGate,
    RecordReport,
    check_image,
    load_json,
    read_records,
    record_object,
    string_field,
)
from lit_adapter.errors import LitAdapterError
from lit_adapter.images import load_image, open_image
from lit_adapter.prompts import CAPTION_INSTRUCTION
from lit_adapter.tokenizer import Tokenizer


class CaptionDataModule(TokenizedDataModule):
    """Image-caption data for training the visual adapter.

    Args:
        data_path: COCO caption annotations (`captions_train2014.json`), a `.jsonl` file of
            {"image": path, "caption": text} records, or "builtin:demo" (generated shape drawings)
        image_dir: the image folder (COCO: where `file_name` lives; JSONL: the base of relative paths, default the
            file's own folder)
        clip_model: the open_clip model whose image transform is used; under `lit-adapter fit` the visual encoder's
            (leave it out); None = ViT-L-14
        image_size: image side in pixels (None: the CLIP model's); under `lit-adapter fit` the visual encoder's
        max_seq_length: longer samples are cut to this many tokens (counted in a warning)
        settings: those of every data module (see `TokenizedDataModule`); val_split is counted in images (all
            captions of an image stay on one side)
    """

    source = CAPTION
    linked_settings = (*TokenizedDataModule.linked_settings, "clip_model", "image_size")

    def __init__(
        self,
        data_path: str,
        image_dir: Optional[Path] = None,
        clip_model: Optional[str] = None,
        image_size: Optional[int] = None,
        max_seq_length: int = 128,
        **settings: Any,
    ) -> None:
        super().__init__(data_path, max_seq_length=max_seq_length, **settings)
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.clip_model = clip_model
        self.image_size = image_size

    @property
    def carries_images(self) -> bool:
        return True

    def split_settings(self, split: str) -> dict:
        # image paths are stored resolved, so the folders they were resolved against are part of the key
        path = self.split_files(split)[0]
        # "image_check": caches made when only image headers were checked are rebuilt, not trusted
        return {"image_dir": str(self._image_root(path).resolve()), "image_check": "decoded"}

    def encode_split(self, split: str, tokenizer: Tokenizer, report: RecordReport) -> EncodedSamples:
        path = self.split_files(split)[0]
        gate = RecordGate(path, report, self.on_bad_record)
        builder = SampleBuilder(report, self.max_seq_length)
        prompt = self.style.apply(CAPTION_INSTRUCTION)
        checked: dict[Path, Optional[BadRecord]] = {}
        records = list(caption_records(path, self._image_root(path)))
        for record, image, caption in tqdm(
            records, desc=f"checking {path.name}", disable=len(records) < PROGRESS_MIN_RECORDS
        ):
            try:
                if record.error is not None:
                    raise record.error
                if image not in checked:
                    checked[image] = _image_problem(image)
                if checked[image] is not None:
                    raise checked[image]
            except BadRecord as bad:
                gate.reject(record, bad)
                continue
            builder.add(*encode_segments(tokenizer, [(prompt, False), (caption, True)]), image=str(image))
        return builder.build()

    def split_keys(self, encoded: EncodedSamples) -> list[str]:
        return encoded.extras["image"]

    def extras_loader(self, encoded: EncodedSamples, train: bool) -> Callable[[int], dict]:
        return ImageLoader(encoded.extras["image"], self.image_transform(train))

    def _image_root(self, path: Path) -> Path:
        return self.image_dir if self.image_dir is not None else path.parent


def _image_problem(image: Path) -> Optional[BadRecord]:
    """Why the image cannot be used, if it cannot. It is decoded in full, as training will decode it: a file whose
    header is fine but whose body is damaged fails here (where `on_bad_record` applies), not midway in training."""
    try:
        check_image(image)
        open_image(image)
    except BadRecord as bad:
        return bad
    except LitAdapterError as err:
        return BadRecord("unreadable image", f"field 'image': {err}")
    return None


def caption_records(path: Path, image_root: Path) -> Iterator[tuple[RawRecord, Path, str]]:
    """(record, image path, caption) for each caption; a record that fails its checks carries the error."""
    if not path.is_file():
        raise LitAdapterError(f"{path}: caption file not found")
    if path.suffix == ".jsonl":
        for record in read_records(path):
            yield _jsonl_caption(record, image_root)
        return
    data = load_json(path)
    if isinstance(data, dict) and "annotations" in data:
        yield from _coco_captions(path, data, image_root)
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield _jsonl_caption(RawRecord(index, value), image_root)
    else:
        raise LitAdapterError(
            f"{path}: expected COCO caption annotations ('images' and 'annotations') or a list of "
            "{'image', 'caption'} records"
        )


def _jsonl_caption(record: RawRecord, image_root: Path) -> tuple[RawRecord, Path, str]:
    if record.error is not None:
        return record, image_root, ""
    try:
        value = record_object(record.value)
        image = image_root / string_field(value, "image")
        caption = string_field(value, "caption")
    except BadRecord as bad:
        record.error = bad
        return record, image_root, ""
    return record, image, caption


def _coco_captions(path: Path, data: dict, image_root: Path) -> Iterator[tuple[RawRecord, Path, str]]:
    images, annotations = data.get("images"), data.get("annotations")
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise LitAdapterError(f"{path}: COCO annotations need the lists 'images' and 'annotations'")
    files: dict = {}
    for number, entry in enumerate(images):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            raise LitAdapterError(f"{path}: images[{number}] needs 'id' and a string 'file_name'")
        files[entry["id"]] = entry["file_name"]
    for index, annotation in enumerate(annotations):
        record = RawRecord(index, annotation)
        try:
            value = record_object(annotation)
            if "image_id" not in value:
                raise BadRecord("missing field 'image_id'")
            if value["image_id"] not in files:
                raise BadRecord("unknown image_id", f"field 'image_id' ({value['image_id']!r}) is not in 'images'")
            yield record, image_root / files[value["image_id"]], string_field(value, "caption")
        except BadRecord as bad:
            record.error = bad
            yield record, image_root, ""


class ImageLoader:
    """Loads sample i's image as RGB and applies the CLIP transform (picklable for worker processes)."""

    def __init__(self, paths: list[str], transform: Callable) -> None:
        self.paths = paths
        self.transform = transform

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": load_image(Path(self.paths[index]), self.transform)}


