"""Fixtures of the adapter tests."""

from __future__ import annotations

import pytest
import torch

import lit_adapter.model as model_module
from lit_adapter.adapters.visual import VisualAdapter
from tests.adapters.helpers import tiny_visual


@pytest.fixture
def float64_base(monkeypatch):
    """The base model's RMSNorm and RoPE run in float32 internally; in float64 here, so logits can be compared to
    the reference at 1e-6 (the same formulas, without float32 rounding)."""
    def rms_norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def rope(x, rotation):
        pairs = x.unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        cos, sin = rotation.real.unsqueeze(-3).to(x.dtype), rotation.imag.unsqueeze(-3).to(x.dtype)
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)

    def rope_tables(seq_len, head_dim, theta, device=None, scaling=None):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
        return torch.polar(torch.ones_like(angles), angles)

    monkeypatch.setattr(model_module.RMSNorm, "forward", rms_norm)
    monkeypatch.setattr(model_module, "apply_rope", rope)
    monkeypatch.setattr(model_module, "build_rope", rope_tables)


@pytest.fixture
def images() -> torch.Tensor:
    """Two random 32x32 images (the tiny CLIP tower's size)."""
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def clip_weights(tmp_path) -> str:
    """A fixed tiny CLIP tower saved to a file, so every model built from the config gets the same frozen tower."""
    torch.manual_seed(7)
    tower = VisualAdapter(tiny_visual(), 64).clip.visual
    path = tmp_path / "tiny_clip.pt"
    torch.save(tower.state_dict(), path)
    return str(path)
