"""Checkpoints: trainable state only, atomic writes, the NaN guard, exact resume after a SIGKILL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from lit_adapter.errors import LitAdapterError
from lit_adapter.training.callbacks import default_callbacks
from lit_adapter.training.checkpoint_io import AtomicCheckpointIO
from tests.training import helpers


def test_checkpoints_hold_only_the_trainable_state_and_restore_it(
    stories260k_dir: Path, instructions: Path, tmp_path: Path
) -> None:
    lit = helpers.module(stories260k_dir)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True)
    trainer = helpers.trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[saver],
                              plugins=[AtomicCheckpointIO()])
    trainer.fit(lit, datamodule=helpers.joint_data(lit, instructions))
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    trained = helpers.trainable_state(lit.model)
    assert set(checkpoint["state_dict"]) == {"model." + name for name in trained}
    for name, tensor in trained.items():
        assert torch.equal(checkpoint["state_dict"]["model." + name], tensor), name
    frozen_bytes = sum(p.numel() * p.element_size() for p in lit.model.parameters() if not p.requires_grad)
    assert (tmp_path / "ckpt" / "last.ckpt").stat().st_size < frozen_bytes  # no frozen weights inside
    assert not list((tmp_path / "ckpt").glob(".*.tmp"))

    fresh = helpers.module(stories260k_dir)
    fresh.configure_model()
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    for name, tensor in trained.items():
        assert torch.equal(dict(fresh.model.named_parameters())[name], tensor), name


def test_a_checkpoint_of_another_adapter_config_is_refused(stories260k_dir: Path) -> None:
    lit = helpers.module(stories260k_dir)
    lit.configure_model()
    with pytest.raises(LitAdapterError, match="lacks .* trainable tensors"):
        lit.on_load_checkpoint({"state_dict": {"model.llama.norm.weight": torch.ones(64)}})


def test_atomic_checkpoint_io_leaves_the_previous_file_when_a_write_fails(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class PoisonAtStep(helpers.Callback):
    """Sets one trainable tensor to NaN before the batch of optimizer step `step` + 1."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.llama.norm.weight.fill_(float("nan"))


def test_a_nan_loss_stops_training_with_one_line_and_keeps_the_last_good_checkpoint(
    stories260k_dir: Path, instructions: Path, tmp_path: Path
) -> None:
    lit = helpers.module(stories260k_dir, visual=False)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True)
    trainer = helpers.trainer(tmp_path, max_steps=6, enable_checkpointing=True, plugins=[AtomicCheckpointIO()],
                              callbacks=[saver, PoisonAtStep(3), *default_callbacks()])
    with pytest.raises(LitAdapterError) as error:
        trainer.fit(lit, datamodule=helpers.joint_data(lit, instructions, captions=False))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("step 3 (instruction batch): the training loss is nan")
    assert str(tmp_path / "ckpt" / "last.ckpt") in message
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
    assert not (tmp_path / "adapter.safetensors").exists()  # nothing exported from a failed run


def test_resume_after_sigkill_reproduces_the_uninterrupted_run_bitwise(
    stories260k_dir: Path, instructions: Path, tmp_path: Path
) -> None:
    """2N steps straight vs N steps, SIGKILL right after step N's checkpoint, `--ckpt_path last` to 2N.

    The training set has 5 instruction + 5 caption batches per epoch (alternating), so step N = 7 is mid-epoch and
    the run crosses an epoch boundary on both sides; every step after the restart depends on the optimizer state,
    the lr schedule and the data position being restored exactly.
    """
    n = 7
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for root, extra in ((straight, {}), (killed, {"callbacks": [{"class_path": "tests.training.helpers.KillAfterStep",
                                                                  "init_args": {"step": n}}]})):
        config = helpers.fit_config(root, stories260k_dir, instructions, max_steps=2 * n, **extra)
        config["checkpoint"] = {"every_n_train_steps": n}
        config["data"]["caption"]["init_args"]["batch_size"] = 64  # 320 demo images: 5 batches per epoch
        helpers.write_config(tmp_path / f"{root.name}.yaml", config)
    first = helpers.run_cli(["fit", "--config", str(tmp_path / "straight.yaml")])
    assert first.returncode == 0, first.stderr[-3000:]
    crashed = helpers.run_cli(["fit", "--config", str(tmp_path / "killed.yaml")])
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    assert (killed / "checkpoints" / "last.ckpt").is_file() and not (killed / "adapter.safetensors").exists()
    resumed = helpers.run_cli(
        ["fit", "--config", str(tmp_path / "killed.yaml"), "--trainer.callbacks=[]", "--ckpt_path", "last"]
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in resumed.stdout + resumed.stderr
    a, b = load_file(straight / "adapter.safetensors"), load_file(killed / "adapter.safetensors")
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    final = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 2 * n
