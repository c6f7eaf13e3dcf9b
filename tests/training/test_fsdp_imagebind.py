"""ImageBind-LLM pre-training (configs/imagebind_pretrain.yaml in miniature, tiny ImageBind, stories260K) under
FSDP on 2 CPU processes (gloo) through `lit-adapter fit`: the frozen encoder stays out of the saved adapter and the
checkpoint, and the adapter ends where one process ends that trains on the same global batches (rank 0's and rank 1's
batches as the two micro-batches of each optimizer step, with their own crops)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lit_adapter.adapters import AdapterConfig, save_adapter
from lit_adapter.data.joint import Source
from lit_adapter.training.cli import fit_main
from tests.encoders.helpers import save_tiny_imagebind
from tests.training import helpers

REPO = Path(__file__).resolve().parents[2]
STEPS, BATCH = 3, 2  # per process; the global batch is 4
FSDP = {"class_path": "lit_adapter.training.fsdp.AdapterFSDPStrategy",
        "init_args": {"compute_dtype": "float32", "process_group_backend": "gloo"}}


def recipe_adapter(encoder: Path) -> dict:
    recipe = yaml.safe_load((REPO / "configs" / "imagebind_pretrain.yaml").read_text())
    adapter = {**recipe["model"]["adapter"], "adapter_layers": 5, "lora_rank": 2, "prompt_style": "raw"}
    adapter["visual"] = {**adapter["visual"], "encoder_weights": str(encoder)}
    return adapter


def pretrain_config(root: Path, checkpoint_dir: Path, encoder: Path, init: Path, **trainer) -> dict:
    recipe = yaml.safe_load((REPO / "configs" / "imagebind_pretrain.yaml").read_text())
    return {
        "seed_everything": 7,
        "trainer": {"accelerator": "cpu", "precision": "32-true", "max_steps": STEPS, "default_root_dir": str(root),
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                    "limit_val_batches": 0, "log_every_n_steps": 1, **trainer},
        "model": {**recipe["model"], "checkpoint_dir": str(checkpoint_dir), "adapter": recipe_adapter(encoder),
                  "init_adapter": str(init), "learning_rate": 0.01, "warmup_epochs": None, "warmup_steps": 1},
        "data": {"caption": {"class_path": "lit_adapter.data.caption.CaptionDataModule",
                             "init_args": {"data_path": "builtin:demo", "max_seq_length": 48, "batch_size": BATCH}}},
        "checkpoint": {"every_n_train_steps": STEPS},
    }  # fmt: skip


@pytest.fixture(scope="module")
def runs(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("fsdp_imagebind")
    encoder = save_tiny_imagebind(tmp / "imagebind_w3D.pth")
    # a common start (FSDP initialises on the meta device, in another order): gates open, everything perturbed, so
    # every trainable tensor gets a gradient from the first step
    model = helpers.adapter_model(stories260k_dir, AdapterConfig.from_dict(recipe_adapter(encoder)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.adapter_parameters().values():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    init = save_adapter(model, tmp / "init")
    del model

    fsdp = pretrain_config(tmp / "fsdp", stories260k_dir, encoder, init, devices=2, strategy=FSDP)
    result = helpers.run_cli(["fit", "--config", str(helpers.write_config(tmp / "fsdp.yaml", fsdp))],
                             env={"HF_HUB_OFFLINE": "1"}, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr

    # the reference, in this process: rank 0's then rank 1's batch k (the very samples and sample seeds, hence
    # crops, that the two processes take) as the two accumulated micro-batches of step k
    shard = Source.batches

    def both_ranks(self, seed, epoch, rank, world_size):
        return [b for pair in zip(*(shard(self, seed, epoch, r, 2) for r in range(2)), strict=True) for b in pair]

    single = pretrain_config(tmp / "single", stories260k_dir, encoder, init, devices=1, accumulate_grad_batches=2)
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Source, "batches", both_ranks)
        torch.set_num_threads(1)
        try:
            fit_main(["--config", str(helpers.write_config(tmp / "single.yaml", single))])
        finally:
            torch.set_num_threads(threads)
    return {"init": init, "fsdp": tmp / "fsdp", "single": tmp / "single"}


def train_losses(root: Path) -> list[float]:
    """train_loss per optimizer step from the CSV log (rank 0's micro-batch: not comparable across the runs)."""
    rows = [row for path in sorted((root / "logs").glob("version_*/metrics.csv")) for row in csv.DictReader(open(path))]
    return [float(row["train_loss"]) for row in rows if row.get("train_loss")]


def test_fsdp_leaves_the_frozen_imagebind_out_of_adapter_and_checkpoint(runs: dict[str, Path]) -> None:
    start = load_file(runs["init"] / "adapter.safetensors")
    fsdp = load_file(runs["fsdp"] / "adapter.safetensors")
    assert fsdp.keys() == start.keys() and not any(name.startswith("visual.clip.") for name in fsdp)
    assert any(name.startswith("visual.bind.") for name in fsdp)
    checkpoint = torch.load(runs["fsdp"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    trainable = {name for name in start if name.startswith("visual.") or ".adaption_prompt." in name}
    assert set(checkpoint) == {"model." + name for name in trainable}  # the recipe's trainable set, full size
    for name in trainable:
        assert checkpoint["model." + name].shape == start[name].shape, name
    for name, tensor in fsdp.items():  # frozen in phase 1: bias, LoRA, norms keep their starting values
        assert torch.equal(tensor, start[name]) != (name in trainable), name


def test_fsdp_imagebind_pretraining_ends_where_one_process_on_the_same_batches_ends(runs: dict[str, Path]) -> None:
    assert len(train_losses(runs["fsdp"])) == len(train_losses(runs["single"])) == STEPS
    start = load_file(runs["init"] / "adapter.safetensors")
    fsdp, single = load_file(runs["fsdp"] / "adapter.safetensors"), load_file(runs["single"] / "adapter.safetensors")
    assert fsdp.keys() == single.keys()
    # the whole update, as tests/training/test_distributed.py compares it (there within 10%): Adam's division by
    # sqrt(v) magnifies rounding differences in coordinates with tiny gradients (the prompts' updates differ by
    # ~7%); the whole update differs by ~0.8%, while steps on rank 0's batches alone (a lost gradient reduction)
    # end ~80% away
    update_single = torch.cat([(single[k] - start[k]).flatten() for k in start])
    update_fsdp = torch.cat([(fsdp[k] - start[k]).flatten() for k in start])
    assert update_single.norm() > 0
    assert (update_fsdp - update_single).norm() / update_single.norm() < 0.02
