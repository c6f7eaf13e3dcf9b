from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from lit_adapter.data import instruction as instruction_module
from lit_adapter.data.encoding import IGNORE_INDEX, LengthGroupedSampler, collate
from lit_adapter.data.instruction import InstructionDataModule
from lit_adapter.errors import LitAdapterError
from lit_adapter.prompts import ALPACA, CHAT_SYSTEM


@pytest.fixture(scope="module")
def alpaca_records(assets: Path) -> list[dict]:
    return json.loads((assets / "alpaca" / "alpaca_data_200.json").read_text())


def module_for(path: Path, tok_path: Path, cache: Path, **kwargs) -> InstructionDataModule:
    settings = dict(tokenizer_path=tok_path, cache_dir=cache, val_split=0, max_seq_length=4096)
    return InstructionDataModule(str(path), **{**settings, **kwargs})


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


def test_labels_mask_the_prompt_and_padding(tmp_path, tok_path, tokenizer, alpaca_records):
    records = alpaca_records[:8]  # with and without input
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)
    module = module_for(write_json(tmp_path / "a.json", records), tok_path, tmp_path / "cache", batch_size=8)
    module.setup()
    batch = collate([module.train_dataset[i] for i in range(8)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for row, record in enumerate(records):
        prompt = ALPACA.apply(record["instruction"], record["input"])
        # the official recipe: encode prompt + output with BOS and EOS, no loss on the first len(encode(prompt)) tokens
        full = tokenizer.encode(prompt + record["output"], bos=True, eos=True)
        n_prompt = len(tokenizer.encode(prompt, bos=True))
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        assert ids[: len(full)].tolist() == full and ids[0] == tokenizer.bos_id
        assert (ids[len(full):] == 0).all() and mask.tolist() == [1] * len(full) + [0] * (ids.numel() - len(full))
        assert (labels[:n_prompt] == IGNORE_INDEX).all() and (labels[len(full):] == IGNORE_INDEX).all()
        supervised = labels[n_prompt : len(full)]
        assert supervised.tolist() == full[n_prompt:]
        assert supervised[-1] == tokenizer.eos_id
        assert tokenizer.decode(supervised[:-1].tolist()) == record["output"]
        assert tokenizer.decode(ids[:n_prompt].tolist()) == prompt


def test_truncation_is_counted(tmp_path, tok_path, tokenizer, alpaca_records, capsys):
    records, limit = alpaca_records[:40], 120
    prompts = [ALPACA.apply(r["instruction"], r["input"]) for r in records]
    lengths = [len(tokenizer.encode(p + r["output"], eos=True)) for p, r in zip(prompts, records, strict=True)]
    prompt_lengths = [len(tokenizer.encode(p)) for p in prompts]
    dropped = sum(p >= limit for p in prompt_lengths)
    truncated = sum(n > limit for n in lengths) - dropped
    assert truncated > 0 and dropped > 0
    module = module_for(write_json(tmp_path / "a.json", records), tok_path, tmp_path / "cache", max_seq_length=limit)
    with pytest.warns(UserWarning, match=f"{truncated} of {40 - dropped} samples were longer than max_seq_length=120"):
        module.setup()
    report = module.reports["all"]
    assert report.truncated == truncated and report.kept == 40 - dropped
    assert dict(report.skipped) == {"no response token within max_seq_length": dropped}
    assert f"; {truncated} truncated to max_seq_length=120" in capsys.readouterr().err
    assert max(len(module.train_dataset[i]["input_ids"]) for i in range(len(module.train_dataset))) == limit


@pytest.mark.parametrize(("val_split", "n_val"), [(0.1, 20), (7, 7), (0, 0)])
def test_seeded_split_is_reproducible_and_disjoint(tmp_path, tok_path, alpaca_records, val_split, n_val):
    path = write_json(tmp_path / "a.json", alpaca_records)

    def split(seed: int) -> tuple[list[int], list[int]]:
        module = module_for(path, tok_path, tmp_path / "cache", val_split=val_split, seed=seed)
        module.setup()
        return module.train_dataset.indices, (module.val_dataset.indices if module.val_dataset else [])

    train, val = split(42)
    assert len(val) == n_val and len(train) == 200 - n_val
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(200))
    assert split(42) == (train, val)
    if n_val:
        assert split(7)[1] != val


def test_bad_val_split(tmp_path, tok_path, alpaca_records):
    path = write_json(tmp_path / "a.json", alpaca_records[:5])
    for bad in (5, 1.5, -0.1):
        with pytest.raises(LitAdapterError, match="val_split"):
            module_for(path, tok_path, tmp_path / "cache", val_split=bad).setup()


@pytest.mark.filterwarnings("ignore:.*truncated")
def test_cache_hit_and_miss(tmp_path, tok_path, alpaca_records, monkeypatch):
    path = write_json(tmp_path / "a.json", alpaca_records[:20])
    cache = tmp_path / "cache"
    first = module_for(path, tok_path, cache)
    first.prepare_data()
    assert first.cache_status == {"all": "built"} and len(list(cache.iterdir())) == 1

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again despite a valid cache")

    with monkeypatch.context() as patch:
        patch.setattr(instruction_module, "encode_segments", no_tokenising)
        second = module_for(path, tok_path, cache)
        second.prepare_data()
        second.setup()
        assert second.cache_status == {"all": "cached"}
        first.setup()
        for i in range(20):
            assert torch.equal(second.train_dataset[i]["labels"], first.train_dataset[i]["labels"])
        # a different seed or batch size does not change the tokens
        module_for(path, tok_path, cache, seed=3, batch_size=9).prepare_data()

    for changed in (dict(max_seq_length=300), dict(prompt_style="chat"), dict(on_bad_record="skip")):
        module = module_for(path, tok_path, cache, **changed)
        module.prepare_data()
        assert module.cache_status == {"all": "built"}, changed
    write_json(path, alpaca_records[:19])
    module = module_for(path, tok_path, cache)
    module.prepare_data()
    assert module.cache_status == {"all": "built"}
    assert len(list(cache.glob("*.pt"))) == 5


def test_conversations_supervise_every_assistant_turn(tmp_path, tok_path, tokenizer):
    conversation = {
        "conversations": [
            {"from": "human", "value": "Who is Tim?"},
            {"from": "gpt", "value": "Tim is a boy."},
            {"from": "human", "value": "What does he like?"},
            {"from": "gpt", "value": "He likes his red ball."},
        ]
    }
    module = module_for(write_json(tmp_path / "c.json", [conversation]), tok_path, tmp_path / "cache")
    module.setup()
    item = module.train_dataset[0]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    first = CHAT_SYSTEM + "###Human: Who is Tim?###Assistant:"
    second = " Tim is a boy.###Human: What does he like?###Assistant:"
    text = first + second + " He likes his red ball.###"
    assert ids == tokenizer.encode(text, eos=True)
    # reference boundaries: token counts of the text up to the end of each prompt / reply
    a = len(tokenizer.encode(first))
    b = len(tokenizer.encode(first + " Tim is a boy.###"))
    c = len(tokenizer.encode(first + second))
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert supervised == list(range(a, b)) + list(range(c, len(ids)))
    assert tokenizer.decode(ids[a:b]) == "Tim is a boy.###"
    assert tokenizer.decode(ids[c:-1]) == "He likes his red ball.###" and ids[-1] == tokenizer.eos_id


@pytest.mark.parametrize(
    ("turns", "fragment"),
    [
        ([{"from": "gpt", "value": "Hi"}], "'conversations[0].from' is 'gpt' where a human turn belongs"),
        ([{"from": "human", "value": "Hi"}], "ends with a human turn"),
        ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}], "'conversations[1].value' (an assistant"),
        ([{"from": "human", "value": "Hi"}, {"from": "gpt"}], "missing field 'conversations[1].value'"),
        ("hello", "field 'conversations' must be a non-empty list"),
    ],
)
def test_bad_conversations(tmp_path, tok_path, turns, fragment):
    path = write_json(tmp_path / "c.json", [{"conversations": turns}])
    with pytest.raises(LitAdapterError, match="record 0: ") as info:
        module_for(path, tok_path, tmp_path / "cache").prepare_data()
    assert fragment in str(info.value)


def test_collate_pads_right_to_the_longest():
    samples = [
        {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, 5, 6])},
        {"input_ids": torch.tensor([1, 7, 8, 9, 2]), "labels": torch.tensor([-100, -100, 8, 9, 2])},
    ]
    batch = collate(samples)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 0, 0], [1, 7, 8, 9, 2]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, -100], [-100, -100, 8, 9, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_length_grouped_sampler():
    lengths = torch.randint(5, 500, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=1)
    order = list(sampler)
    assert sorted(order) == list(range(400)) and list(sampler) == order
    sampler.set_epoch(1)
    assert list(sampler) != order

    def padding(order: list[int]) -> int:
        batches = [[lengths[i] for i in order[k : k + 8]] for k in range(0, len(order), 8)]
        return sum(max(b) * len(b) - sum(b) for b in batches)

    shuffled = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    assert padding(order) < padding(shuffled) / 5


def test_group_by_length_loader(tmp_path, tok_path, alpaca_records):
    module = module_for(write_json(tmp_path / "a.json", alpaca_records), tok_path, tmp_path / "cache",
                        group_by_length=True, batch_size=8)  # fmt: skip
    module.setup()
    loader = module.train_dataloader()
    assert isinstance(loader.sampler, LengthGroupedSampler)
    assert sum(batch["input_ids"].shape[0] for batch in loader) == 200


@pytest.mark.filterwarnings("ignore:.*truncated")
def test_connect_links_the_tokenizer(tmp_path, tok_path, alpaca_records):
    module = InstructionDataModule(str(write_json(tmp_path / "a.json", alpaca_records[:10])), val_split=2,
                                   cache_dir=tmp_path / "cache", max_seq_length=512)  # fmt: skip
    module.connect(tok_path, max_seq_length=256, batch_size=3)
    assert module.max_seq_length == 256 and module.batch_size == 3
    module.connect(tok_path, max_seq_length=1024)
    assert module.max_seq_length == 256  # the smaller of the module's and the model's context
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape[0] == 3
    assert len(module.val_dataloader().dataset) == 2


def test_all_200_alpaca_records(assets, tmp_path, tok_path, capsys):
    module = module_for(assets / "alpaca" / "alpaca_data_200.json", tok_path, tmp_path / "cache")
    start = time.perf_counter()
    module.prepare_data()
    elapsed = time.perf_counter() - start
    module.setup()
    assert module.reports["all"].summary() == "alpaca_data_200.json: 200 records kept, 0 skipped"
    assert len(module.train_dataset) == 200 and module.val_dataset is not None and len(module.val_dataset) == 0
    assert module.val_dataloader() == []
    cache_bytes = sum(f.stat().st_size for f in (tmp_path / "cache").iterdir())
    tokens = int(module.train_dataset.encoded.offsets[-1])
    with capsys.disabled():
        print(f"\nalpaca_data_200: prepared in {elapsed * 1000:.0f} ms, {tokens} tokens, cache {cache_bytes} bytes")


def test_builtin_demo_instructions(tok_path, tmp_path):
    module = InstructionDataModule("builtin:demo", tokenizer_path=tok_path, cache_dir=tmp_path, max_seq_length=256)
    module.setup()
    assert len(module.train_dataset) == 408 and len(module.val_dataset) == 100
    assert module.reports["train"].truncated == 0 and module.reports["val"].truncated == 0
    with pytest.raises(LitAdapterError, match="unknown built-in data 'builtin:alpaca'"):
        InstructionDataModule("builtin:alpaca")
