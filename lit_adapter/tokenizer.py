"""SentencePiece tokenizer with explicit BOS/EOS control and streaming-safe decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Union

from sentencepiece import SentencePieceProcessor

from lit_adapter.errors import LitAdapterError


class Tokenizer:
    def __init__(self, path: Union[str, Path]) -> None:
        path = Path(path)
        if not path.is_file():
            raise LitAdapterError(f"{path}: tokenizer file not found; pass a SentencePiece `tokenizer.model`")
        try:
            self.processor = SentencePieceProcessor(model_file=str(path))
        except Exception as err:  # sentencepiece raises a bare RuntimeError/OSError
            raise LitAdapterError(f"{path}: not a valid SentencePiece model ({err})") from None
        self.path = path
        self.bos_id: int = self.processor.bos_id()
        self.eos_id: int = self.processor.eos_id()
        self.pad_id: int = self.processor.pad_id()

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.processor.encode(text)
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode([int(i) for i in ids])

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns tokens arriving one by one into text pieces, never splitting a multi-byte character or a word's
    leading space: it decodes the whole sequence so far and emits only what is new and complete."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence from byte-fallback pieces: wait for the rest
            return ""
        return self._emit(text)

    def flush(self) -> str:
        return self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text: str) -> str:
        new = text[len(self.emitted):]
        self.emitted = text
        return new
