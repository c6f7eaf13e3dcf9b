"""`convert` and `merge` count their work on a progress bar (stderr, shown on a terminal only)."""

from __future__ import annotations

from lit_adapter.convert import files


class _Recorder:
    def __init__(self, total: int, desc: str, unit: str = "tensor") -> None:
        self.total, self.desc, self.done = total, desc, []

    def __enter__(self) -> _Recorder:
        bars.append(self)
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int) -> None:
        self.done.append(n)


bars: list[_Recorder] = []


def test_chunks_count_every_tensor_once_its_group_is_done(monkeypatch):
    bars.clear()
    monkeypatch.setattr(files, "progress", _Recorder)
    sizes = {"a": 60, "b": 50, "c": 200, "d": 10}
    seen = []
    for group in files.chunks(sizes, sizes.get, budget=100, desc="model.safetensors"):
        seen.append((group, sum(bars[0].done)))  # the bar has counted the groups before this one
    assert seen == [(["a"], 0), (["b"], 1), (["c"], 2), (["d"], 3)]
    assert (bars[0].total, bars[0].desc, sum(bars[0].done)) == (4, "model.safetensors", 4)
    assert list(files.chunks(sizes, sizes.get, budget=100, desc=None)) == [g for g, _ in seen] and len(bars) == 1


def test_the_bar_is_quiet_off_a_terminal():
    with files.progress(3, "x") as bar:  # pytest's stderr is no terminal: tqdm's disable=None turns it off
        assert bar.disable
