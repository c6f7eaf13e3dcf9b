"""The training loss: the classifier on supervised positions only equals the full-logits formula, value and gradient."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn as nn

from lit_adapter.training.loss import head_cross_entropy, masked_cross_entropy


def reference_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over supervised positions of -log softmax(h_t W^T)[label_{t+1}], written out over full logits."""
    logits = (hidden @ weight.t())[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    token_losses = -logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return token_losses[keep].sum(), int(keep.sum())


def frozen_head(weight: torch.Tensor) -> nn.Linear:
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    head.weight = nn.Parameter(weight, requires_grad=False)
    return head


def make_labels(vocab: int) -> torch.Tensor:
    labels = torch.randint(0, vocab, (3, 17))
    labels[:, :5] = -100
    labels[1, 10:] = -100
    return labels


def test_head_cross_entropy_matches_full_logits() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 17, 32, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(100, 32, dtype=torch.float64)
    labels = make_labels(100)
    expected, expected_count = reference_loss(hidden, weight, labels)
    expected.backward()
    expected_grad, hidden.grad = hidden.grad.clone(), None
    total, count = head_cross_entropy(hidden, frozen_head(weight), labels, chunk=7)  # several chunks, last partial
    total.backward()
    assert int(count) == expected_count == 12 + 5 + 12  # labels 5..16 of each row; row 1 only 5..9
    torch.testing.assert_close(total, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hidden.grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert hidden.grad[:, -1].abs().max() == 0  # the last position predicts nothing
    assert hidden.grad[1, 10:].abs().max() == 0  # nor do positions whose next label is ignored


def test_head_cross_entropy_scales_the_upstream_gradient() -> None:
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64)
    labels = torch.randint(0, 30, (2, 9))
    total, count = head_cross_entropy(hidden, frozen_head(weight), labels, chunk=4)
    (3.0 * total / count).backward()
    grad, hidden.grad = hidden.grad.clone(), None
    expected, expected_count = reference_loss(hidden, weight, labels)
    (3.0 * expected / expected_count).backward()
    torch.testing.assert_close(grad, hidden.grad)


def test_head_cross_entropy_equals_masked_cross_entropy_in_bf16() -> None:
    torch.manual_seed(2)
    hidden = torch.randn(2, 9, 16).bfloat16()
    weight = torch.randn(50, 16).bfloat16()
    labels = torch.randint(0, 50, (2, 9))
    total, count = head_cross_entropy(hidden, frozen_head(weight), labels)
    expected_total, expected_count = masked_cross_entropy(hidden @ weight.t(), labels)
    assert total.dtype == torch.float32 and int(count) == int(expected_count)
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-4)


def test_trainable_head_gets_gradients() -> None:
    torch.manual_seed(3)
    hidden = torch.randn(3, 17, 12, dtype=torch.float64)
    head = nn.Linear(12, 40, bias=False, dtype=torch.float64)
    labels = make_labels(40)
    total, _ = head_cross_entropy(hidden, head, labels)
    total.backward()
    expected_grad, head.weight.grad = head.weight.grad.clone(), None
    expected, _ = reference_loss(hidden, head.weight, labels)
    expected.backward()
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(expected_grad, head.weight.grad)


def test_no_gradient_work_without_grad() -> None:
    torch.manual_seed(4)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.randint(0, 20, (2, 6))
    with torch.no_grad():
        total, count = head_cross_entropy(hidden, frozen_head(torch.randn(20, 8)), labels)
    assert not total.requires_grad and int(count) == 10


@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compile_blocks_gives_the_same_loss(stories260k_dir) -> None:
    """`compile_blocks` compiles every LLaMA block; the compiled model computes the loss the eager one does."""
    from tests.training.helpers import module

    eager, compiled = module(stories260k_dir, visual=False), module(stories260k_dir, visual=False, compile_blocks=True)
    eager.configure_model()
    compiled.configure_model()
    assert all(block._compiled_call_impl is not None for block in compiled.model.llama.layers)
    assert all(block._compiled_call_impl is None for block in eager.model.llama.layers)
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 16))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "labels": labels}
    expected_total, expected_count = eager.loss_sums(batch)
    total, count = compiled.loss_sums(batch)
    assert int(count) == int(expected_count) == 2 * 11  # labels 5..15 of each row
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-5)
