"""DDP with 2 CPU processes (gloo) through `lit-adapter fit`: joint training, ranks end bit-identical."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.training import helpers


def test_ddp_two_processes_joint_training_ends_with_identical_adapters(
    stories260k_dir: Path, instructions: Path, tmp_path: Path
) -> None:
    root = tmp_path / "run"
    config = helpers.fit_config(
        root, stories260k_dir, instructions, max_steps=4, devices=2, strategy="ddp_find_unused_parameters_true",
        accumulate_grad_batches=2,
        callbacks=[{"class_path": "tests.training.helpers.SaveRankState", "init_args": {"folder": str(tmp_path)}}],
    )  # fmt: skip
    helpers.write_config(tmp_path / "ddp.yaml", config)
    result = helpers.run_cli(["fit", "--config", str(tmp_path / "ddp.yaml")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    # both groups moved away from their initial values (zero gates, zero biases)
    gates = [t for n, t in ranks[0].items() if n.endswith(".gate") or n.endswith(".visual_gate")]
    assert any(n.endswith(".visual_gate") for n in ranks[0]) and all(bool(g.abs().sum() > 0) for g in gates)
    assert (root / "adapter.safetensors").is_file()
