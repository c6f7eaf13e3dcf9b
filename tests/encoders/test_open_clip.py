"""The open_clip tower behind the encoder interface: the same tensors as its own forward, both modes."""

from __future__ import annotations

import torch

from lit_adapter.adapters.visual import VisualAdapter
from lit_adapter.encoders import Encoder, build_encoder
from tests.helpers import tiny_visual


def test_open_clip_is_an_encoder_with_unchanged_outputs():
    torch.manual_seed(0)
    encoder = build_encoder(tiny_visual())
    assert isinstance(encoder, Encoder) and encoder.modalities == ("vision",) and encoder.output == "tokens"
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = encoder.encode({"vision": images})["vision"]
    assert torch.equal(tokens, encoder(images, all_tokens=True)) and tokens.shape[:2] == (2, 17)
    # a global-mode adapter sets its encoder to the global vector
    adapter = VisualAdapter(tiny_visual(mode="global"), 64, encoder=encoder)
    assert adapter.clip.output == "global"
    assert torch.equal(encoder.encode({"vision": images})["vision"], encoder(images, all_tokens=False))
