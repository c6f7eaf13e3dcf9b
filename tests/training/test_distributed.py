"""2 CPU processes (gloo) through `lit-adapter fit`: DDP ranks end bit-identical; FSDP (sharded, killed and resumed
halfway) ends where DDP does."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_adapter.adapters import save_adapter
from lit_adapter.checkpoint import load_yaml
from lit_adapter.errors import LitAdapterError
from lit_adapter.training.cli import check_ddp_settings
from tests.training import helpers

STEPS = 4
FSDP = {"class_path": "lit_adapter.training.fsdp.AdapterFSDPStrategy", "init_args": {"compute_dtype": "float32"}}


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return helpers.write_tiny_clip_weights(tmp_path_factory.mktemp("clip") / "tiny_clip.pt")


@pytest.fixture(scope="module")
def init_adapter(stories260k_dir: Path, clip_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A starting adapter with every gate open and random biases, so both runs start from the same values."""
    model = helpers.adapter_model(stories260k_dir, helpers.tiny_adapter(clip_weights=clip_weights))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.adapter_parameters().values():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return save_adapter(model, tmp_path_factory.mktemp("init_adapter"))


def two_process_config(root: Path, checkpoint_dir: Path, instructions: Path, init: Path, **trainer) -> dict:
    clip = Path(load_yaml(init / "adapter_config.yaml")["visual"]["clip_pretrained"])
    config = helpers.fit_config(root, checkpoint_dir, instructions, max_steps=STEPS, clip_weights=clip, devices=2,
                                accumulate_grad_batches=2, **trainer)  # fmt: skip
    config["model"]["init_adapter"] = str(init)
    config["checkpoint"] = {"every_n_train_steps": STEPS // 2}
    return config


@pytest.fixture(scope="module")
def ddp_run(
    stories260k_dir: Path, instructions: Path, init_adapter: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    folder = tmp_path_factory.mktemp("ddp")
    saver = {"class_path": "tests.training.helpers.SaveRankState", "init_args": {"folder": str(folder)}}
    config = two_process_config(folder / "run", stories260k_dir, instructions, init_adapter,
                                strategy="ddp_find_unused_parameters_true", callbacks=[saver])  # fmt: skip
    result = helpers.run_cli(["fit", "--config", str(helpers.write_config(folder / "ddp.yaml", config))])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    return folder


def test_ddp_two_processes_joint_training_ends_with_identical_adapters(ddp_run: Path, init_adapter: Path) -> None:
    ranks = [torch.load(ddp_run / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    start = load_file(init_adapter / "adapter.safetensors")
    exported = load_file(ddp_run / "run" / "adapter.safetensors")
    assert exported.keys() == start.keys()
    for name, tensor in exported.items():
        assert torch.equal(tensor, ranks[0][name]), name
        assert not torch.equal(tensor, start[name]), name  # both groups trained (caption and instruction steps)


def test_fsdp_two_processes_sharded_and_resumed_matches_ddp(
    ddp_run: Path, stories260k_dir: Path, instructions: Path, init_adapter: Path, tmp_path: Path
) -> None:
    root = tmp_path / "run"
    killer = {"class_path": "tests.training.helpers.KillAfterStep", "init_args": {"step": STEPS // 2}}
    config = two_process_config(root, stories260k_dir, instructions, init_adapter, strategy=FSDP, callbacks=[killer])
    path = helpers.write_config(tmp_path / "fsdp.yaml", config)
    half = helpers.run_cli(["fit", "--config", str(path)], timeout=240)
    assert half.returncode == -9, half.stderr[-3000:]  # both processes killed themselves after step 2's checkpoint
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    start = load_file(init_adapter / "adapter.safetensors")
    assert set(checkpoint["state_dict"]) == {"model." + name for name in start}  # trainable only, full size
    for name, tensor in start.items():
        assert checkpoint["state_dict"]["model." + name].shape == tensor.shape, name
    resumed = helpers.run_cli(["fit", "--config", str(path), "--trainer.callbacks=[]", "--ckpt_path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the same losses step by step (the second half after the restart) ...
    assert train_losses(root) == pytest.approx(train_losses(ddp_run / "run"), rel=1e-4)
    # ... and the same updates, up to float noise: Adam divides by sqrt(v), which magnifies rounding differences in
    # coordinates with tiny gradients, so the test compares the whole update (a wrong lr, a lost gradient
    # reduction or a step on the wrong group would be ~100% off; reduction-order noise is ~3%)
    fsdp, ddp = load_file(root / "adapter.safetensors"), load_file(ddp_run / "run" / "adapter.safetensors")
    assert fsdp.keys() == ddp.keys()
    update_ddp = torch.cat([(ddp[k] - start[k]).flatten() for k in start])
    update_fsdp = torch.cat([(fsdp[k] - start[k]).flatten() for k in start])
    assert (update_fsdp - update_ddp).norm() / update_ddp.norm() < 0.1


def train_losses(root: Path) -> list[float]:
    """train_loss per optimizer step from the CSV logs (every version: a resumed run writes a new one)."""
    losses: dict[int, float] = {}
    for path in sorted((root / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(open(path)):
            if row.get("train_loss"):
                losses[int(row["step"])] = float(row["train_loss"])
    return [losses[step] for step in sorted(losses)]


def test_plain_ddp_with_joint_data_is_refused_with_the_setting_to_use() -> None:
    from lightning.pytorch.strategies import DDPStrategy

    joint = {"instruction": False, "caption": True}  # what JointDataModule.carries_images declares
    with pytest.raises(LitAdapterError, match="set trainer.strategy: ddp_find_unused_parameters_true"):
        check_ddp_settings(DDPStrategy(), True, joint)
    check_ddp_settings(DDPStrategy(find_unused_parameters=True), True, joint)
    check_ddp_settings(DDPStrategy(), True, {"caption": True})  # captions only: every parameter is used
