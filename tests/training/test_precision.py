"""bf16-true: frozen weights bf16, trainable parameters and optimizer state float32; activation checkpointing."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from lit_adapter.checkpoint import load_model
from lit_adapter.training.names import clean_name
from tests.training import helpers


def test_bf16_true_keeps_trainable_parameters_and_optimizer_state_in_float32(
    stories260k_dir: Path, instructions: Path, tmp_path: Path
) -> None:
    lit = helpers.module(stories260k_dir)
    trainer = helpers.trainer(tmp_path, precision="bf16-true", max_steps=2)
    trainer.fit(lit, datamodule=helpers.joint_data(lit, instructions))
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


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients(stories260k_dir: Path) -> None:
    batch = torch.randint(1, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        lit = helpers.module(stories260k_dir, visual=False, activation_checkpointing=checkpointing)
        lit.configure_model()
        helpers.set_gates(lit.model, 0.5)
        wrapped = [m for m in lit.model.modules() if isinstance(m, CheckpointWrapper)]
        assert len(wrapped) == (5 if checkpointing else 0)  # one per block of stories260K
        lit(batch).float().square().mean().backward()
        grads.append({n: p.grad for n, p in lit.model.named_parameters() if p.requires_grad})
        assert "model.llama.layers.0.attention.wq.bias" in lit.trainable_names()  # no wrapper infix in the keys
        assert set(lit.state_dict()) >= set(lit.trainable_names())
    assert grads[0].keys() == {clean_name(n) for n in grads[1]}
    for name, grad in grads[1].items():
        torch.testing.assert_close(grad, grads[0][clean_name(name)], msg=name)
