"""Image output (official ImageBind-LLM `image_generate.py`): the inputs' ImageBind embeddings, before their
normalisation, mixed by weight -> diffusers' Stable unCLIP image-variation pipeline (extra `[diffusion]`), whose
weights come from a local folder (`stabilityai/stable-diffusion-2-1-unclip` saved with `save_pretrained`).

f = sum_m w_m h_m with h_m the head output (clip inputs averaged; points divided by 5), w normalised as in the
text path; with a cache, the direction is blended and the length kept (`joint.blend_keep_norm`). The pipeline is
called with the raw user prompt and `image_embeds=f` [B, 1024]; its defaults apply (20 steps, guidance 10).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from lit_adapter.encoders.joint import CacheSettings, EmbeddingCache, blend_keep_norm, mix
from lit_adapter.errors import LitAdapterError, first_line

POINT_SCALE = 5.0


def image_embedding(encoder, inputs: Sequence[tuple[str, torch.Tensor, float]],
                    cache: Optional[tuple[EmbeddingCache, CacheSettings]] = None) -> torch.Tensor:
    """The unnormalised mixed embedding [B, embed] the unCLIP pipeline is conditioned on."""
    heads = []
    for modality, x, _ in inputs:
        _, pre = encoder.encode({modality: x}, prenorm=True)
        heads.append(pre[modality] / POINT_SCALE if modality == "point" else pre[modality])
    f = mix(heads, [weight for _, _, weight in inputs], normalize=False)
    return blend_keep_norm(f, *cache) if cache is not None else f


def load_pipeline(folder: Union[str, Path], device: Union[str, torch.device] = "cpu"):
    """StableUnCLIPImg2ImgPipeline from a local folder (nothing is downloaded)."""
    try:
        from diffusers import StableUnCLIPImg2ImgPipeline
    except ImportError:
        raise LitAdapterError("--output_image needs diffusers: pip install -e '.[diffusion]'") from None
    if not Path(folder).is_dir():
        raise LitAdapterError(f"{folder}: unCLIP pipeline folder not found (save the pipeline with save_pretrained)")
    try:
        return StableUnCLIPImg2ImgPipeline.from_pretrained(str(folder), local_files_only=True).to(device)
    except (OSError, ValueError) as err:
        raise LitAdapterError(f"{folder}: cannot load the unCLIP pipeline ({first_line(err)})") from None


@torch.no_grad()
def generate_image(pipeline, prompt: str, embedding: torch.Tensor, path: Union[str, Path],
                   generator: Optional[torch.Generator] = None, **pipeline_options) -> Path:
    """One image for `prompt` conditioned on `embedding` [1, embed], saved to `path`."""
    dim = pipeline.image_normalizer.mean.shape[-1]
    if embedding.shape[-1] != dim:
        raise LitAdapterError(f"the unCLIP pipeline takes {dim}-wide image embeddings, the encoder makes "
                              f"{embedding.shape[-1]}-wide ones")
    embeds = embedding.reshape(-1, dim).to(pipeline.device, pipeline.unet.dtype)
    image = pipeline(prompt=prompt, image_embeds=embeds, generator=generator, **pipeline_options).images[0]
    path = Path(path)
    image.save(path)
    return path
