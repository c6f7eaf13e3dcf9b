"""Streamed generation as text: tokens become whole characters (`StreamDecoder`), then stop sequences are cut
(`StopFilter`): each emits what is safe now and holds back what might still change."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence


class Decodes(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class StreamDecoder:
    """Turns tokens arriving one by one into text pieces that never split a character: a token may hold part of a
    character's UTF-8 bytes (byte-level BPE, SentencePiece byte fallback), and the text waits until the rest comes.

    Each step decodes a short window, the tokens of the last emitted piece plus the new ones, so that a decoder that
    treats the first token specially (SentencePiece drops a leading space) sees the same context each time, and the
    cost per token stays constant instead of growing with the text.
    """

    def __init__(self, tokenizer: Decodes) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # the window: ids[start:] is decoded, ids[start:read] is already shown
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        shown = self.tokenizer.decode(self.ids[self.start : self.read])
        text = self.tokenizer.decode(self.ids[self.start :])
        if text.endswith(REPLACEMENT) or len(text) <= len(shown):  # bytes of a character still to come
            return ""
        self.start, self.read = self.read, len(self.ids)
        return text[len(shown) :]

    def flush(self) -> str:
        """The text still held back at the end of generation (an incomplete character, as the decoder shows it)."""
        shown = self.tokenizer.decode(self.ids[self.start : self.read])
        text = self.tokenizer.decode(self.ids[self.start :])
        self.start = self.read = len(self.ids)
        return text[len(shown) :]


class StopFilter:
    """Feed text pieces in order; `push` returns the text that can be shown now. Once a stop sequence appears,
    `stopped` is True and the text from the stop sequence on is never returned."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.text = ""  # everything returned so far
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(cut)
        return self._emit(len(self.pending) - self._held_back())

    def flush(self) -> str:
        """The held-back tail at the end of generation (it turned out not to be a stop sequence)."""
        return "" if self.stopped else self._emit(len(self.pending))

    def _held_back(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop sequence."""
        for length in range(min(len(self.pending), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(self.pending[-length:]) for s in self.stops):
                return length
        return 0

    def _emit(self, end: int) -> str:
        out, self.pending = self.pending[:end], self.pending[end:]
        if self.stopped:
            self.pending = ""
        self.text += out
        return out


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop sequence, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)
