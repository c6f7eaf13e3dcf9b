"""Nothing non-finite is ever saved: the NaN guard (metrics.NonFiniteGuard) stops before the step, or skips and counts
it; a refused checkpoint or export writes nothing; an earlier good run in the same folder stays what `last` resumes;
a resume takes the learning rate configured now."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from lit_adapter.checkpoint import load_yaml
from lit_adapter.errors import EveryRankError, LitAdapterError
from lit_adapter.training.callbacks import TRAINING_FILE, default_callbacks
from lit_adapter.training.checkpoint_io import AtomicCheckpointIO
from lit_adapter.training.metrics import NonFiniteGuard
from lit_adapter.training.schedule import apply_peak_lr
from tests.training import helpers

NAN = float("nan")


def all_finite_files(folder: Path) -> dict[str, int]:
    """{file: tensors} of every checkpoint and adapter under `folder`, asserting each tensor is finite: an adapter's
    tensors, a checkpoint's parameters and optimizer state (not the callbacks' bookkeeping, where ModelCheckpoint
    keeps an infinite `kth_value` as its "no score yet")."""
    counts = {}
    for path in sorted(folder.rglob("*.ckpt")) + sorted(folder.rglob("*.safetensors")):
        is_adapter = path.suffix == ".safetensors"
        checkpoint = {} if is_adapter else torch.load(path, weights_only=True)
        tensors = load_file(path) if is_adapter else flat_tensors([checkpoint["state_dict"],
                                                                   checkpoint["optimizer_states"]])  # fmt: skip
        assert tensors, path
        for name, tensor in tensors.items():
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), (path, name)
        counts[str(path.relative_to(folder))] = len(tensors)
    return counts


def flat_tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    if torch.is_tensor(value):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else []
    return {k: t for key, item in items for k, t in flat_tensors(item, f"{prefix}.{key}").items()}


def fit_error(result, *fragments: str) -> str:
    """A fit that failed with one error line (exit 2, no traceback) naming every fragment; Lightning's own info
    lines come before it on stderr."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "logs" not in p.parts
            and "tensorboard" not in p.parts}  # fmt: skip


def test_lr_1e6_stops_before_the_step_and_an_earlier_good_run_stays_last(
    stories260k_dir: Path, instructions: Path, tmp_path: Path
) -> None:
    """A good run to step 4, then a fresh run at lr 1e6 in the same folder (checkpoints every 2 steps, no warmup): it
    stops with one line at the first non-finite gradients, writes nothing, leaves the good run's files as they were,
    and the line names the good run's last checkpoint and `--ckpt_path last`, which resumes it (to step 6)."""
    root = tmp_path / "run"
    config = helpers.fit_config(root, stories260k_dir, instructions, max_steps=4)
    config["model"]["warmup_steps"] = 0
    config["checkpoint"] = {"every_n_train_steps": 2}
    path = helpers.write_config(tmp_path / "fit.yaml", config)
    good = helpers.run_cli(["fit", "--config", str(path)])
    assert good.returncode == 0, good.stderr[-3000:]
    before = digests(root)
    assert {"checkpoints/last.ckpt", "checkpoints/step-0000004.ckpt", "adapter.safetensors"} <= set(before)

    bad = helpers.run_cli(["fit", "--config", str(path), "--model.learning_rate", "1e6"])
    last = root / "checkpoints" / "last.ckpt"
    line = fit_error(bad, "step 1 (caption batch): the gradients of", "not finite", "training stopped before the step",
                     "saved nothing non-finite", "resume from it with --ckpt_path last")  # fmt: skip
    assert digests(root) == before  # nothing written, nothing replaced: no last-v1.ckpt, no adapter
    all_finite_files(root)

    named = re.search(r"the last finite checkpoint is (\S+) \(an earlier run's\)", line)[1]
    assert named == str(last)
    resumed = helpers.run_cli(["fit", "--config", str(path), "--ckpt_path", "last", "--trainer.max_steps", "6"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {named}" in resumed.stdout + resumed.stderr
    assert torch.load(last, weights_only=True)["global_step"] == 6
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt", "step-0000006.ckpt"]
    assert all_finite_files(root)["adapter.safetensors"] > 0


class PoisonGradients(helpers.Callback):
    """Puts a NaN into one gradient before the optimizer steps with these indices (runs before the guard)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step in self.steps:
            param = next(p for p in pl_module.model.parameters() if p.grad is not None)
            param.grad.view(-1)[0] = NAN


def guarded_fit(root: Path, stories260k_dir: Path, instructions: Path, callbacks: list, steps: int = 5, **module):
    """Instruction-only training (every step trains the same group), a checkpoint every 2 steps, the CLI's
    callbacks; returns (module, trainer, the exception or None)."""
    lit = helpers.module(stories260k_dir, visual=False, **module)
    saver = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_last=True, filename="step-{step}")
    snapshots = helpers.Snapshots()
    trainer = helpers.trainer(root, max_steps=steps, enable_checkpointing=True, plugins=[AtomicCheckpointIO()],
                              callbacks=[snapshots, *callbacks, saver, *default_callbacks()])  # fmt: skip
    try:
        trainer.fit(lit, datamodule=helpers.joint_data(lit, instructions, captions=False))
    except LitAdapterError as err:
        return lit, trainer, snapshots, err
    return lit, trainer, snapshots, None


def adam_steps(lit) -> set[int]:
    optimizer = lit.trainer.optimizers[0]
    return {int(optimizer.state[p]["step"]) for p in lit.model.parameters() if p.requires_grad}


def test_skip_drops_the_poisoned_steps_counts_them_and_trains_on(
    stories260k_dir: Path, instructions: Path, tmp_path: Path
) -> None:
    lit, trainer, snapshots, error = guarded_fit(tmp_path, stories260k_dir, instructions, [PoisonGradients({1, 2})],
                                                 nonfinite="skip")  # fmt: skip
    assert error is None
    states = snapshots.states  # before training, then after each of the 5 steps
    for skipped in (2, 3):  # after step 1 and step 2: as after step 0, every parameter
        for name, tensor in states[1].items():
            assert torch.equal(states[skipped][name], tensor), name
    assert not torch.equal(states[4]["llama.norm.weight"], states[1]["llama.norm.weight"])  # training went on
    assert adam_steps(lit) == {3}  # AdamW stepped 3 times: the skipped steps left no trace in its state
    guard = next(cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard))
    assert guard.skipped == 2 and trainer.global_step == 5
    assert trainer.callback_metrics["skipped_steps"] == 2
    assert load_yaml(tmp_path / TRAINING_FILE)["skipped_steps"] == 2
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["callbacks"]["NonFiniteGuard"] == {"skipped": 2}  # the count survives a resume
    all_finite_files(tmp_path)


def test_skip_stops_after_skip_limit_steps_in_a_row(stories260k_dir: Path, instructions: Path, tmp_path: Path) -> None:
    _, trainer, _, error = guarded_fit(tmp_path, stories260k_dir, instructions, [PoisonGradients({1, 2, 3, 4})],
                                       nonfinite="skip", skip_limit=3)  # fmt: skip
    message = str(error)
    assert message.startswith("step 3 (instruction batch): the gradients of 1 of ")
    assert "not finite, 3 steps in a row (skip_limit 3); training stopped before the step (2 earlier" in message
    assert f"the last finite checkpoint is {tmp_path / 'ckpt'}" in message
    all_finite_files(tmp_path)


class PoisonAfterStep(helpers.Callback):
    """After the optimizer step that makes global_step `step`, puts an infinity into a parameter ("param"), an AdamW
    moment ("moment"), or (at the end of training) a parameter the export would write ("export")."""

    def __init__(self, step: int, what: str) -> None:
        self.step, self.what = step, what

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.what != "export":
            param = pl_module.model.llama.norm.weight
            target = param if self.what == "param" else trainer.optimizers[0].state[param]["exp_avg_sq"]
            with torch.no_grad():
                target.view(-1)[0] = float("inf")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.what == "export":
            with torch.no_grad():
                pl_module.model.llama.norm.weight.view(-1)[0] = NAN


@pytest.mark.parametrize(
    ("callback", "expected", "last_step"),
    [
        (PoisonGradients({3}), "step 3 (instruction batch): the gradients of 1 of", 2),
        (PoisonAfterStep(4, "param"), "step 3 (instruction batch): the update made 1 parameter tensors", 2),
        (PoisonAfterStep(4, "moment"), "step 3 (instruction batch): the checkpoint would hold 1 non-finite", 2),
        (PoisonAfterStep(5, "export"), "the trained adapter holds 1 non-finite tensors", 4),
    ],
    ids=["gradients", "parameters", "optimizer-state", "export"],
)
def test_stop_writes_nothing_non_finite(
    callback, expected: str, last_step: int, stories260k_dir: Path, instructions: Path, tmp_path: Path
) -> None:
    _, trainer, snapshots, error = guarded_fit(tmp_path, stories260k_dir, instructions, [callback])
    message = str(error)
    assert message.startswith(expected) and "\n" not in message, message
    # the guard's stops are taken by every rank at once, so only global rank 0 prints them; the export is rank 0's
    assert isinstance(error, EveryRankError) == (expected != "the trained adapter holds 1 non-finite tensors")
    if last_step == 2:
        assert f"the last finite checkpoint is {tmp_path / 'ckpt'}" in message
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == last_step
    assert not (tmp_path / "adapter.safetensors").exists()
    all_finite_files(tmp_path)
    if isinstance(callback, PoisonGradients):  # the step was not taken: the parameters are those after step 2
        for name, tensor in snapshots.states[3].items():
            assert torch.equal(dict(trainer.lightning_module.model.named_parameters())[name], tensor), name


def test_a_resume_takes_the_learning_rate_configured_now(
    stories260k_dir: Path, instructions: Path, tmp_path: Path
) -> None:
    """Lightning restores the optimizer's learning rates: without `apply_peak_lr` a run resumed with a lower lr, as
    the stop line advises, would go on at the old one."""
    guarded_fit(tmp_path, stories260k_dir, instructions, [], steps=2, learning_rate=1e-2)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    old_lr = checkpoint["optimizer_states"][0]["param_groups"][0]["lr"]
    apply_peak_lr(checkpoint, 1e-4)
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert all(g["initial_lr"] == 1e-4 and g["lr"] == pytest.approx(old_lr / 100) for g in groups)
    assert checkpoint["lr_schedulers"][0]["base_lrs"] == [1e-4] * len(groups)

    lit = helpers.module(stories260k_dir, visual=False, learning_rate=1e-4)
    trainer = helpers.trainer(tmp_path, max_steps=3)
    trainer.fit(lit, datamodule=helpers.joint_data(lit, instructions, captions=False),
                ckpt_path=tmp_path / "ckpt" / "last.ckpt")  # fmt: skip
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [1e-4] * len(groups)
    assert all(g["initial_lr"] == 1e-4 for g in trainer.optimizers[0].param_groups)



def test_a_resume_from_an_explicit_file_takes_the_settings_given_now(
    stories260k_dir: Path, instructions: Path, tmp_path: Path
) -> None:
    """`--ckpt_path FILE` as `--ckpt_path last`: the learning rate given now, not the one saved in the file (which
    Lightning's CLI would put back into the configuration)."""
    root = tmp_path / "run"
    config = helpers.fit_config(root, stories260k_dir, instructions, max_steps=2)
    config["checkpoint"] = {"every_n_train_steps": 2}
    path = helpers.write_config(tmp_path / "fit.yaml", config)
    first = helpers.run_cli(["fit", "--config", str(path)])
    assert first.returncode == 0, first.stderr[-3000:]
    saved = root / "checkpoints" / "step-0000002.ckpt"
    assert torch.load(saved, weights_only=True)["lr_schedulers"][0]["base_lrs"][0] == 0.01
    resumed = helpers.run_cli(["fit", "--config", str(path), "--ckpt_path", str(saved), "--trainer.max_steps", "4",
                               "--model.learning_rate", "0.001"])  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = torch.load(root / "checkpoints" / "step-0000004.ckpt", weights_only=True)
    assert last["global_step"] == 4 and last["hyper_parameters"]["learning_rate"] == 0.001
    groups = last["optimizer_states"][0]["param_groups"]
    assert last["lr_schedulers"][0]["base_lrs"] == [0.001] * len(groups)
    assert all(group["initial_lr"] == 0.001 for group in groups)


def test_an_every_rank_error_is_printed_by_global_rank_zero_only(monkeypatch, capsys) -> None:
    """Under DDP every process raises the guard's stop at the same step: one line on the terminal, not one per rank;
    any other error still prints on every rank (it may be one rank's own)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    import lit_adapter.cli

    printed = {}
    for rank in (0, 1):
        for error in (EveryRankError("step 3: the gradients are not finite"), LitAdapterError("rank's own file")):
            def fail(name: str, rest: list, error: Exception = error) -> None:
                raise error

            monkeypatch.setattr(lit_adapter.cli, "run_command", fail)
            monkeypatch.setattr(rank_zero_only, "rank", rank)
            with pytest.raises(SystemExit) as exit_:
                lit_adapter.cli.main(["fit"])
            printed[rank, type(error).__name__] = (exit_.value.code, capsys.readouterr().err)
    assert printed[0, "EveryRankError"] == (2, "error: step 3: the gradients are not finite\n")
    assert printed[1, "EveryRankError"] == (2, "")
    assert printed[0, "LitAdapterError"] == printed[1, "LitAdapterError"] == (2, "error: rank's own file\n")
