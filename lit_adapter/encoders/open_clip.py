"""The open_clip image tower behind the encoder interface (LLaMA-Adapter V1/V2's visual path).

The implementation lives in `lit_adapter.adapters.clip` (names, weights, transforms), unchanged in behaviour;
this module is its place among the encoders. `ClipEncoder.encode({"vision": images})` gives every token after
`ln_post` and the projection (`tokens` True) or the global embedding.
"""

from __future__ import annotations

from lit_adapter.adapters.clip import (  # noqa: F401  (the encoder's public names)
    TINY_CLIP_MODEL,
    ClipEncoder,
    build_clip_encoder,
    clip_embed_dim,
    clip_image_size,
    image_transform,
    load_open_clip,
)
