from __future__ import annotations

import json
import re
import time
from pathlib import Path

from PIL import Image

from lit_adapter.data import demo


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generation_is_deterministic_fast_and_atomic(tmp_path):
    start = time.perf_counter()
    first = demo.demo_dir(tmp_path / "a")
    elapsed = time.perf_counter() - start
    second = demo.demo_dir(tmp_path / "b")
    assert elapsed < 10
    contents = files_of(first)
    assert len(contents) == 4 + 360 and contents == files_of(second)
    assert [p.name for p in (tmp_path / "a").iterdir()] == [demo.DEMO_VERSION]  # no temporary folder left behind
    stamp = (first / demo.INSTRUCTIONS_TRAIN).stat().st_mtime_ns
    assert demo.demo_dir(tmp_path / "a") == first and (first / demo.INSTRUCTIONS_TRAIN).stat().st_mtime_ns == stamp


def test_default_location_is_the_cache(private_cache):
    train, val = demo.demo_instruction_files()
    assert train.parent == private_cache / "demo" / demo.DEMO_VERSION and val.is_file()


def test_instruction_stories_use_the_words_they_are_asked_for():
    train, val = demo.instruction_examples()
    assert len(train) == 408 and len(val) == 100
    keys = [(r["instruction"], r["input"]) for r in train + val]
    assert len(set(keys)) == len(keys)  # train and val disjoint, no duplicates
    for record in train + val:
        sentences = re.findall(r"[^.!?]+[.!?]", record["output"])
        assert 2 <= len(sentences) <= 4
        asked = re.findall(r"named (\w+) who likes (\w+)s\.", record["instruction"])
        words = list(asked[0]) if asked else record["input"].split(", ") if record["input"] else []
        for word in words:
            assert word in record["output"], record
    assert any(r["input"] for r in train) and any(not r["input"] for r in train)


def test_captions_describe_the_drawings(tmp_path):
    folder = demo.demo_dir(tmp_path)
    parts = {}
    for name in (demo.CAPTIONS_TRAIN, demo.CAPTIONS_VAL):
        parts[name] = [json.loads(line) for line in (folder / name).read_text().splitlines()]
    train, val = parts[demo.CAPTIONS_TRAIN], parts[demo.CAPTIONS_VAL]
    assert len(train) == 320 and len(val) == 40
    assert {r["caption"] for r in train}.isdisjoint(r["caption"] for r in val)
    pattern = re.compile(r"A (small|big) (\w+) (circle|square|triangle) (?:on the|at the|in the) (\w+)\.")
    for record in train[:60] + val:
        size, colour, shape, where = pattern.fullmatch(record["caption"]).groups()
        image = Image.open(folder / record["image"]).convert("RGB")
        side = image.size[0]
        assert image.size == (side, side) and 64 <= side <= 224
        (fx, fy), _ = demo.POSITIONS[where]
        centre = (round(fx * side), round(fy * side + (0.05 * side if shape == "triangle" else 0)))
        assert image.getpixel(centre) == demo.COLOURS[colour], record
        if where != "center":  # the opposite side of the canvas is background
            assert image.getpixel((round((1 - fx) * side), round((1 - fy) * side))) != demo.COLOURS[colour]
        # area: a small shape covers under 5% of the canvas, a big one over 7%
        covered = sum(pixel == demo.COLOURS[colour] for pixel in image.getdata()) / side**2
        assert covered < 0.05 if size == "small" else covered > 0.07, (record, covered)
