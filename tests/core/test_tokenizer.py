"""SentencePiece wrapper on the real tok512.model (BPE, 512 pieces, byte fallback)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lit_adapter.errors import LitAdapterError
from lit_adapter.inference.stream import StreamDecoder
from lit_adapter.tokenizer import Tokenizer

MIXED = "Lily said 你好, world! Ünïcödé 🙂 and 中文也可以。"


@pytest.fixture(scope="module")
def tokenizer(assets: Path) -> Tokenizer:
    return Tokenizer(assets / "stories260K" / "tok512.model")


def test_bos_eos_control(tokenizer: Tokenizer) -> None:
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 512)
    text = "Once upon a time"
    plain = tokenizer.encode(text, bos=False)
    assert 1 not in plain and 2 not in plain and plain
    assert tokenizer.encode(text) == [1, *plain]  # bos by default, no eos
    assert tokenizer.encode(text, bos=False, eos=True) == [*plain, 2]
    assert tokenizer.encode(text, bos=True, eos=True) == [1, *plain, 2]
    assert tokenizer.decode([1, *plain, 2]) == text  # control tokens decode to nothing


def test_chinese_and_english_round_trip_through_byte_fallback(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(MIXED, bos=False)
    pieces = [tokenizer.backend.processor.id_to_piece(i) for i in ids]
    # 你 is E4 BD A0 in UTF-8: a 512-piece vocabulary has no Chinese pieces, so it falls back to bytes
    assert pieces[pieces.index("<0xE4>"): pieces.index("<0xE4>") + 3] == ["<0xE4>", "<0xBD>", "<0xA0>"]
    assert tokenizer.decode(ids) == MIXED


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_decoder_waits_for_whole_characters(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("你", bos=False)  # "▁" then three byte pieces
    assert len(ids) == 4
    assert stream(tokenizer, ids)[1:] == ["", "", "你", ""]


def test_stream_decoder_concatenates_to_the_full_decode(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    alphabet = list("abcdefghij XYZ,.!?") + list("你好中文世界") + list("éüßñ") + ["🙂", "🚀", "\n"]
    texts = [MIXED, "Once upon a time, there was a little girl named Lily."]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(30)]
    for text in texts:
        ids = tokenizer.encode(text, bos=False)
        pieces = stream(tokenizer, ids)
        assert not any("\ufffd" in piece for piece in pieces), (text, pieces)
        assert "".join(pieces) == tokenizer.decode(ids), text


def test_bad_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(LitAdapterError, match="tokenizer file not found"):
        Tokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(LitAdapterError, match=f"{junk}: not a valid SentencePiece model"):
        Tokenizer(junk)


def test_control_pieces_written_in_the_text_are_their_ids(tokenizer: Tokenizer) -> None:
    """A chat template writes `<s>` / `</s>` as text: they become the control ids, the text around them as before."""
    plain = tokenizer.encode("Once upon a time", bos=False)
    assert tokenizer.encode("<s>Once upon a time</s>", bos=False) == [1, *plain, 2]
    ids, starts = tokenizer.encode_with_offsets("你好 Lily")
    assert len(ids) == len(starts) and starts == sorted(starts) and starts[-1] < len("你好 Lily")
