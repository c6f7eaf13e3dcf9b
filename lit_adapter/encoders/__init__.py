"""Frozen encoders behind one interface: inputs of some modalities -> embeddings in the encoder's own space.

An encoder says which modalities it takes (`modalities`), how wide its embeddings are (`embed_dim`), whether it
gives every token or one global vector per input (`output`), and maps `{modality: tensor}` to `{modality: tensor}`
(`encode`). The adapters above it never ask which encoder they have.

- `open_clip.py`: the open_clip image tower (LLaMA-Adapter V1/V2): "vision", tokens or the global vector.
- `imagebind.py` (+ `imagebind_point.py`): ImageBind-Huge in its official state-dict layout, with the Point-BERT
  trunk of `imagebind_w3D.pth`: vision (images, video), text, audio, depth, thermal, imu, point; global vectors.
- `retrieval.py`: the cross-modal cache of ImageBind-LLM (top-k over stored embeddings).

Preprocessing from files (images, video, audio, depth, thermal, IMU, point clouds) is in `lit_adapter.media`.
Heavy libraries (open_clip, torchvision, torchaudio, av) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Mapping, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from torch import nn

    from lit_adapter.adapters.visual import VisualConfig

Output = Literal["tokens", "global"]


@runtime_checkable
class Encoder(Protocol):
    """What the adapters need of an encoder (see the module docstring)."""

    modalities: tuple[str, ...]
    embed_dim: int

    @property
    def output(self) -> Output: ...

    def encode(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`{modality: batch}` -> `{modality: [B, N, embed_dim] tokens or [B, embed_dim]}` (no gradients)."""
        ...


def build_encoder(config: VisualConfig, device: torch.device | str | None = None) -> nn.Module:
    """The frozen encoder a visual config names: open_clip's tower, or ImageBind from `config.encoder_weights`."""
    if config.encoder == "imagebind":
        from lit_adapter.encoders.imagebind import load_imagebind

        return load_imagebind(config.encoder_weights, device=device)
    from lit_adapter.encoders.open_clip import build_clip_encoder

    return build_clip_encoder(config, device)
