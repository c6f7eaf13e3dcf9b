"""The benchmarks' two losses agree, and the report helpers are right."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.generate import agreement
from lit_adapter.config import ModelConfig
from lit_adapter.model import LLaMA


def test_ours_loss_is_the_mean_of_the_full_logits_loss() -> None:
    from benchmarks.training import mean_cross_entropy, ours_loss
    from lit_adapter.adapters import AdapterConfig, attach_adapters

    torch.manual_seed(0)
    base = LLaMA(ModelConfig.from_name("tiny"))
    base.reset_parameters()
    model = attach_adapters(base, AdapterConfig.v1(adapter_layers=1))
    ids = torch.randint(0, 512, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    expected = mean_cross_entropy(model(ids), labels)
    torch.testing.assert_close(ours_loss(model)(ids, labels), expected)
    logits = model(ids)[:, :-1].reshape(-1, 512)
    torch.testing.assert_close(expected, F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100))


def test_report_helpers() -> None:
    assert harness.ratio(3.0, 2.0) == 1.5
    assert harness.ratio(1.0, 0.0) is None and harness.ratio(None, 1.0) is None
    table = harness.format_table([{"a": "x", "b": 1234.5}], [("a", "A", str), ("b", "B", harness.fmt_number(1))])
    assert table.splitlines() == ["| A | B       |", "|---|---------|", "| x | 1,234.5 |"]
    assert agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.5
    assert agreement([[1, 2], [3]], [[1, 2], [3]]) == 1.0
    assert 0.0 <= harness.cpu_busy(0.05) <= 1.0
