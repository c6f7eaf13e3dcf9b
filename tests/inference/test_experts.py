"""Experts (V2 §4.4): image -> text, inserted into the prompt as context."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from lit_adapter.checkpoint import load_model
from lit_adapter.cli import main
from lit_adapter.errors import LitAdapterError
from lit_adapter.inference.engine import Decoding, build_prompt
from lit_adapter.inference.experts import CAPTION_INSTRUCTION, CaptionFileExpert, load_expert
from lit_adapter.prompts import get_prompt_style
from tests.helpers import write_image
from tests.inference.conftest import engine_for, visual_adapter

ALPACA = get_prompt_style("alpaca")


@pytest.fixture
def scienceqa_captions(assets):
    path = assets / "scienceqa" / "captions.json"
    return path, json.loads(path.read_text())["captions"]


def test_caption_file_finds_scienceqa_captions_by_problem_folder(scienceqa_captions, tmp_path):
    path, captions = scienceqa_captions
    pid = sorted(captions, key=int)[3]
    image = write_image(tmp_path / "test" / pid / "image.png", (10, 10, 200))
    assert load_expert(f"caption_file:{path}")(image) == captions[pid]
    with pytest.raises(LitAdapterError, match=f"{path}: no caption for image .*other.png"):
        load_expert(f"caption_file:{path}")(write_image(tmp_path / "nowhere" / "other.png", (0, 0, 0)))


def test_caption_file_flat_map_by_name_or_stem_and_bad_files(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"dog.jpg": "A dog.", "cat": "A cat."}))
    expert = CaptionFileExpert(flat)
    assert expert(tmp_path / "dog.jpg") == "A dog." and expert(tmp_path / "x" / "cat.png") == "A cat."
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(LitAdapterError, match=r"broken.json: invalid JSON in caption file \(Expecting"):
        CaptionFileExpert(broken)
    with pytest.raises(LitAdapterError, match="missing.json: caption file not found"):
        load_expert(f"caption_file:{tmp_path / 'missing.json'}")


def test_expert_text_goes_into_the_chosen_slot(stories260k_dir, scienceqa_captions, tmp_path):
    path, captions = scienceqa_captions
    pid = next(iter(captions))
    image = write_image(tmp_path / pid / "image.png", (200, 200, 0))
    engine = engine_for(stories260k_dir, load_model(stories260k_dir), style="alpaca")
    expert = load_expert(f"caption_file:{path}")
    assert build_prompt(engine, "What is shown?", "", image, expert) == ALPACA.apply("What is shown?", captions[pid])
    assert build_prompt(engine, "What is shown?", "Be brief.", image, expert) == ALPACA.apply(
        "What is shown?", f"{captions[pid]}\nBe brief."
    )
    assert build_prompt(engine, "What is shown?", "", image, expert, slot="instruction") == ALPACA.apply(
        f"{captions[pid]}\nWhat is shown?"
    )
    with pytest.raises(LitAdapterError, match="no visual encoder"):
        build_prompt(engine, "What is shown?", "", image)  # a text-only model needs an expert to use an image


def test_generate_and_batch_cli_put_the_caption_in_the_prompt(stories260k_dir, scienceqa_captions, tmp_path, capsys):
    path, captions = scienceqa_captions
    pid = sorted(captions, key=int)[5]
    image = write_image(tmp_path / "images" / pid / "image.png", (30, 160, 30))
    expected = ALPACA.apply("Describe the picture.", captions[pid])
    common = ["generate", "--checkpoint_dir", str(stories260k_dir), "--prompt_style", "alpaca", "--max_new_tokens", "5",
              "--expert", f"caption_file:{path}"]
    main([*common, "--prompt", "Describe the picture.", "--image", str(image), "--json"])
    record = json.loads(capsys.readouterr().out)
    n_tokens = len(engine_for(stories260k_dir, load_model(stories260k_dir)).tokenizer.encode(expected))
    assert record["prompt_tokens"] == n_tokens

    prompts_file = tmp_path / "in.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "Describe the picture.", "image": f"images/{pid}/image.png"}) + "\n"
                            + json.dumps({"prompt": "Describe the picture."}) + "\n")
    main([*common, "--prompts_file", str(prompts_file), "--output_file", str(tmp_path / "out.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0]["prompt_tokens"] == n_tokens and rows[0]["output"] == record["text"]
    assert rows[1]["prompt_tokens"] < n_tokens  # no image, no caption


def test_self_caption_uses_the_caption_instruction_and_the_image(stories260k_dir, tmp_path):
    model = visual_adapter(load_model(stories260k_dir))
    engine = engine_for(stories260k_dir, model, style="alpaca")
    red, blue = write_image(tmp_path / "red.png", (220, 0, 0)), write_image(tmp_path / "blue.png", (0, 0, 220))
    expert = load_expert("self_caption", captioner=engine.caption)
    ids = engine.encode(ALPACA.apply(CAPTION_INSTRUCTION))
    reference = engine.complete(ids, Decoding(max_new_tokens=64), visual_tokens=engine.visual_tokens([red])).text
    assert expert(red) == reference.strip()
    assert engine.caption(red, CAPTION_INSTRUCTION) != engine.caption(blue, CAPTION_INSTRUCTION)
    with pytest.raises(LitAdapterError, match="self_caption' needs a multimodal"):
        load_expert("self_caption")


def test_user_expert_by_class_path(tmp_path, monkeypatch):
    (tmp_path / "my_experts.py").write_text(
        "class Shout:\n    def __call__(self, image):\n        return image.stem.upper()\n"
        "class Broken:\n    def __call__(self, image):\n        return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_expert("my_experts:Shout")(tmp_path / "duck.png") == "DUCK"
    with pytest.raises(LitAdapterError, match="returned int"):
        load_expert("my_experts:Broken")(tmp_path / "duck.png")
    with pytest.raises(LitAdapterError, match="has no attribute 'Missing'"):
        load_expert("my_experts:Missing")
    with pytest.raises(LitAdapterError, match="unknown expert 'nonsense'"):
        load_expert("nonsense")
    sys.modules.pop("my_experts", None)


def test_ocr_without_an_engine_is_a_clear_error():
    if any(importlib.util.find_spec(name) for name in ("pytesseract", "easyocr")):
        pytest.skip("an OCR engine is installed")
    with pytest.raises(LitAdapterError, match="pip install pytesseract"):
        load_expert("ocr")
