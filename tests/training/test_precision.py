"""bf16-true: frozen weights bf16, trainable parameters and optimizer state float32."""

from __future__ import annotations

from pathlib import Path

import torch

from lit_adapter.checkpoint import load_model
from tests.training import helpers


def test_bf16_true_keeps_trainable_parameters_and_optimizer_state_in_float32(
    stories260k_dir: Path, instructions: Path, tmp_path: Path
) -> None:
    lit = helpers.module(stories260k_dir)
    trainer = helpers.trainer(tmp_path, precision="bf16-true", max_steps=2)
    trainer.fit(lit, datamodule=helpers.joint_data(instructions))
    trainable = {n: p for n, p in lit.model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in lit.model.named_parameters() if not p.requires_grad}
    assert trainable and frozen
    assert {p.dtype for p in frozen.values()} == {torch.bfloat16}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    state = trainer.optimizers[0].state
    assert {name for name, p in trainable.items() if p in state} == set(trainable)  # both steps reached every group
    for name, param in trainable.items():
        assert state[param]["exp_avg"].dtype == torch.float32, name
        assert state[param]["exp_avg_sq"].dtype == torch.float32, name
    # the frozen weights really are the base ones, rounded to bf16
    reference = load_model(stories260k_dir).tok_embeddings.weight
    assert torch.equal(lit.model.llama.tok_embeddings.weight, reference.to(torch.bfloat16))
