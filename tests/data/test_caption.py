from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lit_adapter.adapters.visual import TINY_CLIP_MODEL, image_transform
from lit_adapter.data.caption import CAPTION_INSTRUCTION, CaptionDataModule
from lit_adapter.data.encoding import IGNORE_INDEX
from lit_adapter.prompts import ALPACA
from tests.helpers import write_image

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "white": (255, 255, 255)}


def coco_folder(root: Path) -> tuple[Path, Path]:
    """A COCO-layout set: annotations/captions_train2014.json + train2014/ with 4 images, 2 captions each."""
    images, annotations = [], []
    for number, colour in enumerate(COLOURS):
        name = f"COCO_train2014_{number:012d}.jpg"
        write_image(root / "train2014" / name, COLOURS[colour], size=40 + 8 * number)
        images.append({"id": 100 + number, "file_name": name, "height": 48, "width": 48})
        for k, text in enumerate((f"A {colour} square.", f"Everything is {colour}.")):
            annotations.append({"id": 10 * number + k, "image_id": 100 + number, "caption": text})
    path = root / "annotations" / "captions_train2014.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path, root / "train2014"


def caption_module(data_path, tok_path, cache, **kwargs) -> CaptionDataModule:
    settings = dict(tokenizer_path=tok_path, clip_model=TINY_CLIP_MODEL, cache_dir=cache, max_seq_length=256)
    return CaptionDataModule(str(data_path), **{**settings, **kwargs})


def test_coco_annotations(tmp_path, tok_path, tokenizer):
    annotations, image_dir = coco_folder(tmp_path / "coco")
    module = caption_module(annotations, tok_path, tmp_path / "cache", image_dir=image_dir, val_split=1, batch_size=8)
    module.setup()
    assert module.reports["all"].summary() == "captions_train2014.json: 8 records kept, 0 skipped"
    train, val = module.train_dataset, module.val_dataset
    assert len(train) == 6 and len(val) == 2  # one image (both of its captions) held out
    val_images = {train.encoded.extras["image"][i] for i in val.indices}
    assert len(val_images) == 1 and val_images.isdisjoint(train.encoded.extras["image"][i] for i in train.indices)

    batch = next(iter(module.val_dataloader()))
    assert batch["images"].shape == (2, 3, 32, 32) and batch["images"].dtype == torch.float32
    # each image is the eval CLIP transform of its RGB file; the caption is the supervised response
    transform = image_transform(TINY_CLIP_MODEL, train=False)
    prompt = ALPACA.apply(CAPTION_INSTRUCTION)
    for row, index in enumerate(val.indices):
        path = Path(train.encoded.extras["image"][index])
        assert torch.allclose(batch["images"][row], transform(Image.open(path).convert("RGB")))
        labels = batch["labels"][row]
        supervised = labels[labels != IGNORE_INDEX].tolist()
        colour = next(c for c in COLOURS if path.name.endswith(f"{list(COLOURS).index(c):012d}.jpg"))
        assert tokenizer.decode(supervised[:-1]) in (f"A {colour} square.", f"Everything is {colour}.")
        assert batch["input_ids"][row, : len(tokenizer.encode(prompt))].tolist() == tokenizer.encode(prompt)
    train_batch = next(iter(module.train_dataloader()))
    assert train_batch["images"].shape == (6, 3, 32, 32)


def test_coco_unknown_image_id(tmp_path, tok_path):
    annotations, image_dir = coco_folder(tmp_path / "coco")
    data = json.loads(annotations.read_text())
    data["annotations"][3]["image_id"] = 999
    annotations.write_text(json.dumps(data))
    module = caption_module(annotations, tok_path, tmp_path / "cache", image_dir=image_dir, on_bad_record="skip")
    module.prepare_data()
    assert dict(module.reports["all"].skipped) == {"unknown image_id": 1}


@pytest.mark.parametrize("relative_to", ["file", "image_dir"])
def test_jsonl_captions(tmp_path, tok_path, relative_to):
    base = tmp_path / ("data" if relative_to == "file" else "pictures")
    for number, colour in enumerate(COLOURS):
        write_image(base / "img" / f"{number}.png", COLOURS[colour])
    path = tmp_path / "data" / "captions.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps({"image": f"img/{n}.png", "caption": f"A {c} square."}) + "\n"
                            for n, c in enumerate(COLOURS)))  # fmt: skip
    image_dir = base if relative_to == "image_dir" else None
    module = caption_module(path, tok_path, tmp_path / "cache", image_dir=image_dir, val_split=0, batch_size=4)
    module.setup()
    batch = next(iter(module.train_dataloader()))
    assert batch["images"].shape == (4, 3, 32, 32)
    assert module.reports["all"].kept == 4


def test_builtin_demo_captions(tok_path, tmp_path):
    module = caption_module("builtin:demo", tok_path, tmp_path / "cache", image_size=48, batch_size=5)
    module.setup()
    assert len(module.train_dataset) == 320 and len(module.val_dataset) == 40
    assert module.reports["train"].truncated == 0
    batch = next(iter(module.train_dataloader()))
    assert batch["images"].shape == (5, 3, 48, 48)
