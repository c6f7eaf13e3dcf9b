"""tokenizer.json through `tokenizers`, checked against transformers' PreTrainedTokenizerFast on the same folder:
ids and text on English, Chinese and emoji, BOS as each family has it, stop ids from the config files, streaming
decode that never shows half a character."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lit_adapter.errors import LitAdapterError
from lit_adapter.inference.stream import StreamDecoder
from lit_adapter.tokenizer import Tokenizer, copy_tokenizer, find_tokenizer_file
from tests.hf_tokenizer import (
    CHINESE,
    CORPUS,
    EMOJI,
    ENGLISH,
    QWEN2_SPLIT,
    save_tokenizer_folder,
    train_byte_level_bpe,
    transformers_tokenizer,
)

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MIXED = "Lily said 你好, world! 中文也可以。 🙂🚀 naïve café"


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama 3's layout: BOS from the post-processor, EOS <|end_of_text|>, generation ends on either end token."""
    folder = tmp_path_factory.mktemp("llama3-tokenizer")
    hf = train_byte_level_bpe(CORPUS, LLAMA3_SPECIALS, bos="<|begin_of_text|>")
    ids = [hf.token_to_id(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    save_tokenizer_folder(folder, hf, bos="<|begin_of_text|>", eos="<|end_of_text|>", eos_token_ids=ids)
    return folder


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2's layout: no BOS at all, EOS <|im_end|> in tokenizer_config.json, <|endoftext|> as well in the
    generation config."""
    folder = tmp_path_factory.mktemp("qwen-tokenizer")
    hf = train_byte_level_bpe(CORPUS, QWEN_SPECIALS, split=QWEN2_SPLIT)
    ids = [hf.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    save_tokenizer_folder(folder, hf, bos=None, eos="<|im_end|>", pad="<|endoftext|>", eos_token_ids=ids,
                          add_bos_token=False)
    return folder


TEXTS = [*ENGLISH, *CHINESE, *EMOJI, MIXED, "", " leading space", "tabs\tand\nnew lines\n\n", "数字 12345 与 1,000"]


@pytest.mark.parametrize("name", ["llama3_folder", "qwen_folder"])
def test_ids_and_text_equal_transformers(name: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(name)
    ours, reference = Tokenizer(folder / "tokenizer.json"), transformers_tokenizer(folder)
    assert ours.vocab_size == len(reference)
    for text in TEXTS:
        assert ours.encode(text, bos=False) == reference.encode(text, add_special_tokens=False), text
        assert ours.encode(text, bos=True) == reference.encode(text), text  # BOS exactly where transformers adds one
        ids = ours.encode(text, bos=True, eos=True)
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True) == text
    # special tokens written in the text are single ids, as transformers reads them
    text = "<|im_start|>user\n你好<|im_end|>" if name == "qwen_folder" else "<|start_header_id|>user<|end_header_id|>"
    assert ours.encode(text, bos=False) == reference.encode(text, add_special_tokens=False)


def test_the_corpus_really_has_partial_character_tokens(qwen_folder: Path) -> None:
    """A token holding part of a character's bytes is what the streaming test is about: make sure there are some."""
    tokenizer = Tokenizer(qwen_folder / "tokenizer.json")
    pieces = [tokenizer.decode([i]) for text in CHINESE + EMOJI for i in tokenizer.encode(text, bos=False)]
    assert sum("\ufffd" in piece for piece in pieces) >= 10


def test_bos_eos_and_stop_ids_follow_the_config_files(llama3_folder: Path, qwen_folder: Path) -> None:
    from transformers import GenerationConfig

    llama3, qwen = Tokenizer(llama3_folder), Tokenizer(qwen_folder)  # a folder: its tokenizer.json
    llama3_ref, qwen_ref = transformers_tokenizer(llama3_folder), transformers_tokenizer(qwen_folder)
    assert (llama3.bos_id, llama3.eos_id) == (llama3_ref.bos_token_id, llama3_ref.eos_token_id)
    assert llama3.special_tokens["bos_token"] == "<|begin_of_text|>"
    assert qwen.bos_id is None and qwen_ref.bos_token_id is None
    assert (qwen.eos_id, qwen.pad_id) == (qwen_ref.eos_token_id, qwen_ref.pad_token_id)
    for ours, folder in ((llama3, llama3_folder), (qwen, qwen_folder)):
        generation = GenerationConfig.from_pretrained(str(folder))
        assert set(ours.stop_ids) == set(generation.eos_token_id) and len(ours.stop_ids) == 2
    assert llama3.token_id("<|eot_id|>") in llama3.stop_ids and llama3.token_id("<|end_of_text|>") in llama3.stop_ids


@pytest.mark.parametrize(("post_processor_bos", "add_bos_token"), [(True, False), (False, True)])
def test_the_post_processor_decides_bos_as_in_transformers(tmp_path: Path, post_processor_bos, add_bos_token) -> None:
    """transformers' PreTrainedTokenizerFast keeps tokenizer.json's post-processor whatever add_bos_token says."""
    hf = train_byte_level_bpe(CORPUS, LLAMA3_SPECIALS, bos="<|begin_of_text|>" if post_processor_bos else None)
    save_tokenizer_folder(tmp_path, hf, bos="<|begin_of_text|>", eos="<|end_of_text|>", add_bos_token=add_bos_token)
    ours, reference = Tokenizer(tmp_path / "tokenizer.json"), transformers_tokenizer(tmp_path)
    assert ours.encode("Hello 你好") == reference.encode("Hello 你好")
    assert (ours.encode("Hello 你好")[0] == ours.token_id("<|begin_of_text|>")) == post_processor_bos


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_streaming_chinese_one_token_at_a_time_never_shows_a_broken_character(qwen_folder: Path) -> None:
    tokenizer, reference = Tokenizer(qwen_folder / "tokenizer.json"), transformers_tokenizer(qwen_folder)
    rng = random.Random(0)
    alphabet = list("".join(CHINESE)) + ["🙂", "🚀", "👨‍👩‍👧", "é", " ", "\n", "a", "Z"]
    texts = [*CHINESE, *EMOJI, MIXED] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
                                         for _ in range(60)]
    for text in texts:
        ids = tokenizer.encode(text, bos=False)
        pieces = stream(tokenizer, ids)
        assert not any("\ufffd" in piece for piece in pieces), (text, pieces)
        assert "".join(pieces) == reference.decode(ids, skip_special_tokens=True) == text


def test_copy_and_find_keep_the_companion_files(llama3_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"an older SentencePiece tokenizer")
    target = copy_tokenizer(llama3_folder / "tokenizer.json", tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]  # one tokenizer kind
    assert find_tokenizer_file(tmp_path) == target
    assert Tokenizer(target).stop_ids == Tokenizer(llama3_folder).stop_ids


def test_bad_files_are_one_line(tmp_path: Path, llama3_folder: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LitAdapterError, match=r"tokenizer.json: not a valid Hugging Face tokenizer.json \("):
        Tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(LitAdapterError, match="tokenizer file not found; pass a SentencePiece"):
        Tokenizer(tmp_path / "nothing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_bytes((llama3_folder / "tokenizer.json").read_bytes())
    (broken / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(LitAdapterError, match=r"broken/tokenizer_config.json: invalid JSON in tokenizer_config.json"):
        Tokenizer(broken)
    (broken / "tokenizer_config.json").write_text(json.dumps({"chat_template": 7}))
    with pytest.raises(LitAdapterError, match="'chat_template' must be a Jinja template string"):
        Tokenizer(broken)
