"""Stop sequences over streamed text: emit what is safe, hold back what might be the start of a stop sequence."""

from __future__ import annotations

from collections.abc import Sequence


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
