"""Every kind of bad input: one clear line naming the file, the record and the field, or skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_adapter.data.caption import CaptionDataModule
from lit_adapter.data.instruction import InstructionDataModule
from lit_adapter.data.scienceqa import ScienceQADataModule, load_problems
from lit_adapter.errors import LitAdapterError
from tests.helpers import write_image

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi!"}


def write_jsonl(path: Path, lines: list) -> Path:
    """`lines`: records (dumped as JSON) or raw bytes (written as they are)."""
    raw = [line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


def prepare(path: Path, tok_path: Path, tmp_path: Path, **kwargs) -> InstructionDataModule:
    module = InstructionDataModule(
        str(path), tokenizer_path=tok_path, cache_dir=tmp_path / "cache", val_split=0, max_seq_length=4096, **kwargs
    )
    module.prepare_data()
    return module


def expect_error(path: Path, tok_path: Path, tmp_path: Path, *fragments: str) -> str:
    with pytest.raises(LitAdapterError) as info:
        prepare(path, tok_path, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize(
    ("bad", "fragments", "reason"),
    [
        ({"input": "", "output": "x"}, ["field 'instruction'"], "missing field 'instruction'"),
        ({"instruction": "x", "input": "", "output": 5}, ["field 'output' must be a string, found int"],
         "wrong type for field 'output'"),
        ({"instruction": "x", "input": ["a"], "output": "y"}, ["field 'input' must be a string, found list"],
         "wrong type for field 'input'"),
        ({"instruction": "x", "input": "", "output": "  "}, ["field 'output' is empty"], "empty output"),
        (["not", "an", "object"], ["expected a JSON object, found list"], "record not a JSON object"),
    ],
)  # fmt: skip
def test_bad_field_error_and_skip(tmp_path, tok_path, capsys, bad, fragments, reason):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, bad, GOOD])
    expect_error(path, tok_path, tmp_path, "record 2 (line 3)", *fragments)
    module = prepare(path, tok_path, tmp_path, on_bad_record="skip")
    assert module.reports["all"].summary() == f"data.jsonl: 3 records kept, 1 skipped (1 {reason})"
    assert f"data.jsonl: 3 records kept, 1 skipped (1 {reason})" in capsys.readouterr().err


def test_malformed_json_line(tmp_path, tok_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, b'{"instruction": "x", "output": }', GOOD])
    expect_error(path, tok_path, tmp_path, "record 1 (line 2)", "malformed JSON")
    module = prepare(path, tok_path, tmp_path, on_bad_record="skip")
    assert dict(module.reports["all"].skipped) == {"malformed JSON": 1}
    assert module.reports["all"].kept == 2


def test_blank_jsonl_lines_are_not_records(tmp_path, tok_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({"instruction": "x"}) + "\n")
    expect_error(path, tok_path, tmp_path, "record 1 (line 3)", "field 'output'")


def test_malformed_json_file_names_line_and_column(tmp_path, tok_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"instruction": "x", "output": "y"},\n  {"instruction": oops}\n]')
    expect_error(path, tok_path, tmp_path, "malformed JSON at line 3 column 19")
    path.write_text('{"instruction": "x", "output": "y"}')
    expect_error(path, tok_path, tmp_path, "expected a JSON list of records, found dict")


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_invalid_utf8_names_the_record_and_field(tmp_path, tok_path, suffix):
    good = json.dumps(GOOD).encode()
    bad = b'{"instruction": "x", "output": "caf\xe9"}'  # Latin-1, not UTF-8
    path = tmp_path / f"data{suffix}"
    path.write_bytes(b"[" + good + b",\n" + bad + b"]" if suffix == ".json" else good + b"\n" + bad + b"\n")
    expect_error(path, tok_path, tmp_path, "record 1", "field 'output' is not valid UTF-8")
    module = prepare(path, tok_path, tmp_path, on_bad_record="skip")
    assert dict(module.reports["all"].skipped) == {"invalid UTF-8 in field 'output'": 1}


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_byte_order_mark_is_accepted(tmp_path, tok_path, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps([GOOD]) if suffix == ".json" else json.dumps(GOOD)).encode())
    assert prepare(path, tok_path, tmp_path).reports["all"].kept == 1


def test_summary_line_on_real_alpaca_records(assets, tmp_path, tok_path, capsys):
    records = json.loads((assets / "alpaca" / "alpaca_data_200.json").read_text())
    records[5]["output"] = ""
    del records[17]["instruction"]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    expect_error(path, tok_path, tmp_path, "record 5:", "field 'output' is empty", "on_bad_record='skip'")
    module = prepare(path, tok_path, tmp_path, on_bad_record="skip")
    expected = "alpaca.json: 198 records kept, 2 skipped (1 empty output, 1 missing field 'instruction')"
    assert module.reports["all"].summary() == expected
    assert expected in capsys.readouterr().err
    module.setup()
    assert len(module.train_dataset) == 198


def test_missing_file_and_bad_settings(tmp_path, tok_path):
    with pytest.raises(LitAdapterError, match="data file not found"):
        prepare(tmp_path / "absent.json", tok_path, tmp_path)
    with pytest.raises(LitAdapterError, match="on_bad_record='ignore' is not one of error, skip"):
        InstructionDataModule("x.json", on_bad_record="ignore")
    with pytest.raises(LitAdapterError, match="no tokenizer"):
        InstructionDataModule(str(write_jsonl(tmp_path / "d.jsonl", [GOOD]))).prepare_data()


def test_missing_and_unreadable_images(tmp_path, tok_path):
    write_image(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    records = [
        {"image": "img/ok.png", "caption": "A red square."},
        {"image": "img/absent.png", "caption": "A cat."},
        {"image": "img/broken.png", "caption": "A dog."},
    ]
    path = write_jsonl(tmp_path / "captions.jsonl", records)

    def module(**kwargs) -> CaptionDataModule:
        return CaptionDataModule(str(path), tokenizer_path=tok_path, cache_dir=tmp_path / "cache",
                                 max_seq_length=512, val_split=0, **kwargs)  # fmt: skip

    with pytest.raises(LitAdapterError, match=r"captions.jsonl: record 1 \(line 2\): field 'image': image file .*"
                       r"absent.png not found"):  # fmt: skip
        module().prepare_data()
    skipping = module(on_bad_record="skip")
    skipping.prepare_data()
    assert skipping.reports["all"].summary() == (
        "captions.jsonl: 1 records kept, 2 skipped (1 missing image, 1 unreadable image)"
    )
    path.write_text(json.dumps(records[2]) + "\n")
    with pytest.raises(LitAdapterError, match=r"record 0 \(line 1\): field 'image': cannot read image"):
        module().prepare_data()


def test_bad_scienceqa_split_lists_the_valid_ones(assets, tmp_path, tok_path):
    expected = r"pid_splits.json: unknown split 'minival'; valid splits: test, train, val$"
    with pytest.raises(LitAdapterError, match=expected):
        load_problems(assets / "scienceqa", "minival")
    module = ScienceQADataModule(assets / "scienceqa", tokenizer_path=tok_path, val_split="dev", cache_dir=tmp_path)
    with pytest.raises(LitAdapterError, match="unknown split 'dev'"):
        module.prepare_data()


def test_scienceqa_missing_image_is_counted(assets, tmp_path, tok_path):
    images = tmp_path / "images"
    problems = load_problems(assets / "scienceqa", "train")
    with_image = [p for p in problems if p.image]
    for problem in with_image[1:]:  # the first one's image is left missing
        write_image(images / "train" / problem.pid / problem.image)
    common = dict(
        tokenizer_path=tok_path, val_split=None, image_dir=images, cache_dir=tmp_path / "c", max_seq_length=2048
    )
    with pytest.raises(LitAdapterError, match=f"problem {with_image[0].pid}: field 'image': image file .* not found"):
        ScienceQADataModule(assets / "scienceqa", **common).prepare_data()
    module = ScienceQADataModule(assets / "scienceqa", on_bad_record="skip", **common)
    module.prepare_data()
    assert module.reports["train"].summary() == "problems.json[train]: 49 records kept, 1 skipped (1 missing image)"
