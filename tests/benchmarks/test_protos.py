"""The prototype optimisations compute what the code they replace computes, and the report helpers are right."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import harness, protos
from benchmarks.generate import agreement
from lit_adapter.config import ModelConfig
from lit_adapter.model import LLaMA, apply_rope, build_rope


def test_head_cross_entropy_matches_full_logits() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 17, 32, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(100, 32, dtype=torch.float64)
    labels = torch.randint(0, 100, (3, 17))
    labels[:, :5] = -100
    labels[1, 10:] = -100
    # reference: the explicit formula over full logits, -mean log softmax at the next token of supervised positions
    logits = (hidden @ weight.t())[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    reference = -(logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0])[keep].mean()
    reference.backward()
    expected_grad, hidden.grad = hidden.grad.clone(), None
    loss = protos.head_cross_entropy(hidden, weight, labels, chunk=7)  # several chunks, the last one partial
    loss.backward()
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, expected_grad, rtol=1e-6, atol=1e-9)
    assert hidden.grad[:, -1].abs().max() == 0  # the last position predicts nothing


def test_head_cross_entropy_bf16_close_to_float32() -> None:
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 16)
    weight = torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 9))
    exact = protos.masked_cross_entropy(hidden @ weight.t(), labels)
    low = protos.head_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact, rtol=2e-2, atol=2e-2)


def test_complex_rope_equals_apply_rope() -> None:
    x = torch.randn(2, 9, 4, 16)
    cos, sin = build_rope(9, 16, 10000.0)
    torch.testing.assert_close(protos.complex_rope(x, cos, sin), apply_rope(x, cos, sin))
    positions = torch.tensor([[0, 1, 2], [5, 6, 7]])  # per-row positions, as in a left-padded batch
    torch.testing.assert_close(protos.complex_rope(x[:, :3], cos[positions], sin[positions]),
                               apply_rope(x[:, :3], cos[positions], sin[positions]))


def test_swiglu_function_gradients() -> None:
    a = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(protos.SwiGLU.apply(a, b), F.silu(a) * b)
    assert torch.autograd.gradcheck(protos.SwiGLU.apply, (a, b))


def test_ours_loss_with_head_ce_equals_plain_loss() -> None:
    from lit_adapter.adapters import AdapterConfig, build_adapter_model

    torch.manual_seed(0)
    base = LLaMA(ModelConfig.from_name("tiny"))
    base.reset_parameters()
    model = build_adapter_model(base, AdapterConfig.v1(adapter_layers=1))
    ids = torch.randint(0, 512, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    expected = protos.ours_loss(model, [])(ids, labels)
    torch.testing.assert_close(protos.ours_loss(model, ["head_ce"])(ids, labels), expected)


def test_report_helpers() -> None:
    assert harness.ratio(3.0, 2.0) == 1.5
    assert harness.ratio(1.0, 0.0) is None and harness.ratio(None, 1.0) is None
    table = harness.format_table([{"a": "x", "b": 1234.5}], [("a", "A", str), ("b", "B", harness.fmt_number(1))])
    assert table.splitlines() == ["| A | B       |", "|---|---------|", "| x | 1,234.5 |"]
    assert agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.5
    assert agreement([[1, 2], [3]], [[1, 2], [3]]) == 1.0
    assert 0.0 <= harness.cpu_busy(0.05) <= 1.0
