"""File modes: what the atomic writer (files.py) and the cache folders leave has the modes `open()` and `mkdir()`
would give under the process's umask (0644 files, 0755 folders under umask 022), not mkstemp's 0600 or mkdtemp's
0700; a fit's whole output, cache included, follows the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from lit_adapter.files import atomic_path, file_mode, folder_mode, save_yaml, temporary_dir, umask, write_text

MODES = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700), 0o002: (0o664, 0o775)}


@pytest.fixture(params=sorted(MODES), ids=lambda mask: f"umask{mask:03o}")
def mask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_umask_is_read_without_changing_it(mask: int) -> None:
    assert umask() == mask
    assert os.umask(mask) == mask  # still the same
    assert (file_mode(), folder_mode()) == MODES[mask]


def test_atomic_writes_get_the_modes_open_and_mkdir_give(mask: int, tmp_path: Path) -> None:
    files, folders = MODES[mask]
    write_text("a", tmp_path / "new" / "deeper" / "a.txt")
    save_yaml({"k": 1}, tmp_path / "b.yaml")
    with open(tmp_path / "reference.txt", "w") as f:  # what open() gives, for comparison
        f.write("r")
    for path in (tmp_path / "new" / "deeper" / "a.txt", tmp_path / "b.yaml", tmp_path / "reference.txt"):
        assert mode(path) == files, path
    assert mode(tmp_path / "new") == mode(tmp_path / "new" / "deeper") == folders


def test_a_replaced_file_keeps_its_mode_as_with_open(mask: int, tmp_path: Path) -> None:
    target = tmp_path / "shared.yaml"
    target.write_text("old")
    target.chmod(0o640)
    save_yaml({"new": True}, target)
    assert mode(target) == 0o640 and target.read_text() == "new: true\n"


def test_a_failed_write_leaves_neither_a_temporary_nor_a_changed_target(tmp_path: Path) -> None:
    target = tmp_path / "x.txt"
    target.write_text("kept")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"] and target.read_text() == "kept"


def test_checkpoints_and_temporary_folders(mask: int, tmp_path: Path) -> None:
    from lit_adapter.training.checkpoint_io import AtomicCheckpointIO

    files, folders = MODES[mask]
    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "ckpts" / "last.ckpt")
    assert mode(tmp_path / "ckpts" / "last.ckpt") == files and mode(tmp_path / "ckpts") == folders
    assert mode(temporary_dir(tmp_path / "cache" / "stories260K")) == folders


def test_demo_data_folder_follows_the_umask(mask: int, tmp_path: Path) -> None:
    from lit_adapter.data.demo import demo_dir

    files, folders = MODES[mask]
    folder = demo_dir(tmp_path)
    assert assert_modes(folder, files, folders) > 300
    assert (folder / "images").is_dir()


def assert_modes(root: Path, files: int, folders: int) -> int:
    """Every file under `root` has mode `files`, every folder `folders` (root included); returns how many."""
    seen = 0
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        assert mode(path) == (folders if path.is_dir() else files), (path, oct(mode(path)))
        seen += 1
    return seen


def test_a_fit_leaves_every_file_0644_and_folder_0755_under_umask_022(
    assets: Path, instructions: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A joint fit from the name "stories260K" (converted into a fresh cache), on the built-in demo captions (written
    into it) with its tokenised data cached there too, checkpoints, logs and the exported adapter: every path."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lit_adapter.training.callbacks import default_callbacks
    from lit_adapter.training.checkpoint_io import AtomicCheckpointIO
    from tests.training import helpers

    old = os.umask(0o022)
    try:
        cache, run = tmp_path / "cache", tmp_path / "run"
        monkeypatch.setenv("LIT_ADAPTER_CACHE", str(cache))
        monkeypatch.setenv("LIT_ADAPTER_ASSETS", str(assets))
        lit = helpers.module(Path("stories260K"))
        saver = ModelCheckpoint(dirpath=run / "checkpoints", every_n_train_steps=1, save_last=True)
        trainer = helpers.trainer(run, max_steps=2, enable_checkpointing=True, plugins=[AtomicCheckpointIO()],
                                  logger=CSVLogger(run, name="logs"), callbacks=[saver, *default_callbacks()])
        trainer.fit(lit, datamodule=helpers.joint_data(lit, instructions))
        assert (cache / "stories260K").is_dir() and (cache / "tokenized").is_dir()
        assert (run / "adapter.safetensors").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
        assert assert_modes(cache, 0o644, 0o755) > 300  # the demo images among them
        assert assert_modes(run, 0o644, 0o755) > 8
    finally:
        os.umask(old)
