"""Kill debris and retention: runs killed in the middle of checkpoint writes, resumed with `--ckpt_path last` each
time, end with no temporaries and with `save_top_k: 1` kept; another run's checkpoints in the folder are untouched."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Optional

import torch

from lit_adapter.files import atomic_path, remove_stale_temporaries, temporary_target
from lit_adapter.training.checkpoint_io import RUN_ID, AtomicCheckpointIO
from tests.training import helpers


class KillingCheckpointIO(AtomicCheckpointIO):
    """Writes as AtomicCheckpointIO does, but SIGKILLs its own process in the middle of writing the checkpoint file
    called `name` at global step `step`: the temporary file is left as a kill leaves it (empty, or `partial` bytes
    of the checkpoint), the target is not replaced."""

    def __init__(self, step: int, name: str, partial: int = 0) -> None:
        super().__init__()
        self.step, self.name, self.partial = step, name, partial

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if checkpoint["global_step"] == self.step and Path(path).name == self.name:
            with atomic_path(Path(path)) as tmp:
                torch.save(checkpoint, tmp)
                with open(tmp, "r+b") as f:
                    f.truncate(self.partial)
                os.kill(os.getpid(), signal.SIGKILL)
        super().save_checkpoint(checkpoint, path, storage_options)


def attempt(tmp_path: Path, root: Path, checkpoint_dir: Path, instructions: Path, number: int,
            kill: Optional[dict] = None, resume: bool = True):  # fmt: skip
    config = helpers.fit_config(root, checkpoint_dir, instructions, max_steps=8)
    config["checkpoint"] = {"every_n_train_steps": 2}  # save_top_k 1, save_last: the CLI's defaults
    if kill is not None:
        config["trainer"]["plugins"] = [{"class_path": "tests.training.test_debris.KillingCheckpointIO",
                                         "init_args": kill}]  # fmt: skip
    path = helpers.write_config(tmp_path / f"attempt{number}.yaml", config)
    return helpers.run_cli(["fit", "--config", str(path), *(["--ckpt_path", "last"] if resume else [])])


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_killed_writes_leave_nothing_behind_and_retention_holds_across_resumes(
    stories260k_dir: Path, instructions: Path, tmp_path: Path
) -> None:
    root = tmp_path / "run"
    folder = root / "checkpoints"
    folder.mkdir(parents=True)
    # another run's checkpoints in the same folder (one of a run id, one from before run ids): never touched
    torch.save({"global_step": 6, RUN_ID: "another-run", "state_dict": {}}, folder / "step-0000012.ckpt")
    torch.save({"global_step": 6, "state_dict": {}}, folder / "older.ckpt")
    foreign = {name: (folder / name).read_bytes() for name in ("step-0000012.ckpt", "older.ckpt")}

    # 1: killed while writing last.ckpt at step 4 (after step-0000004.ckpt is complete)
    first = attempt(tmp_path, root, stories260k_dir, instructions, 1, {"step": 4, "name": "last.ckpt"}, resume=False)
    assert first.returncode == -9, first.stderr[-3000:]
    leftovers = [n for n in names(folder) if temporary_target(n) == "last.ckpt"]
    assert len(leftovers) == 1 and (folder / leftovers[0]).stat().st_size == 0  # what a kill leaves
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 2
    assert "step-0000004.ckpt" in names(folder)  # newer than `last`: without cleaning, an orphan from now on

    # 2: resumed from step 2 and killed the same way at step 6; 3: resumed from step 4, killed mid step-8 write
    second = attempt(tmp_path, root, stories260k_dir, instructions, 2, {"step": 6, "name": "last.ckpt"})
    assert second.returncode == -9, second.stderr[-3000:]
    third = attempt(tmp_path, root, stories260k_dir, instructions, 3,
                    {"step": 8, "name": "step-0000008.ckpt", "partial": 1000})  # fmt: skip
    assert third.returncode == -9, third.stderr[-3000:]
    assert [temporary_target(n) for n in names(folder) if temporary_target(n)] == ["step-0000008.ckpt"]
    assert "step-0000008-v1.ckpt" not in names(folder) and "step-0000006-v1.ckpt" not in names(folder)

    # 4: resumed from step 6 to the end (and an earlier export killed midway left a temporary in the run folder)
    (root / ".adapter.safetensors.k1ll3d00.tmp").write_bytes(b"\0" * 100)
    last = attempt(tmp_path, root, stories260k_dir, instructions, 4)
    assert last.returncode == 0, last.stderr[-3000:]
    assert not [n for n in names(root) if temporary_target(n)] and (root / "adapter.safetensors").is_file()
    assert names(folder) == ["last.ckpt", "older.ckpt", "step-0000008.ckpt", "step-0000012.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 8
    for name, data in foreign.items():
        assert (folder / name).read_bytes() == data, name
    run_ids = {torch.load(folder / n, weights_only=True)[RUN_ID] for n in ("last.ckpt", "step-0000008.ckpt")}
    assert len(run_ids) == 1 and "another-run" not in run_ids  # one run, four attempts


def test_remove_stale_temporaries_removes_only_what_the_atomic_writer_names(tmp_path: Path) -> None:
    for name in (".last.ckpt.ab_d1234.tmp", ".step-0000004.ckpt.zz9zz9zz.tmp", ".adapter.safetensors.k2k2k2k2.tmp",
                 "last.ckpt", ".last.ckpt.tmp", "notes.tmp", ".last.ckpt.toolongname.tmp"):  # fmt: skip
        (tmp_path / name).write_bytes(b"")
    (tmp_path / ".demo.abcdefgh.tmp").mkdir()  # a killed temporary_dir
    removed = remove_stale_temporaries(tmp_path, lambda name: name.endswith(".ckpt"))
    assert sorted(p.name for p in removed) == [".last.ckpt.ab_d1234.tmp", ".step-0000004.ckpt.zz9zz9zz.tmp"]
    assert sorted(p.name for p in remove_stale_temporaries(tmp_path)) == [".adapter.safetensors.k2k2k2k2.tmp",
                                                                         ".demo.abcdefgh.tmp"]  # fmt: skip
    assert names(tmp_path) == [".last.ckpt.tmp", ".last.ckpt.toolongname.tmp", "last.ckpt", "notes.tmp"]
