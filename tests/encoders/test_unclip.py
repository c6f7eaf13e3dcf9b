"""Image output: the pre-normalisation mix as the official `image_generate.py` forms it, and a tiny random Stable
unCLIP pipeline (built here from its components, saved and loaded from a local folder) turning it into an image."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lit_adapter.encoders.imagebind import load_imagebind
from lit_adapter.encoders.joint import CacheSettings, EmbeddingCache
from lit_adapter.encoders.unclip import generate_image, image_embedding, load_pipeline
from lit_adapter.errors import LitAdapterError
from tests.encoders.helpers import save_tiny_imagebind

diffusers = pytest.importorskip("diffusers")


def tiny_pipeline(folder):
    """Stable unCLIP img2img at toy sizes: 1024-wide image embeddings (ImageBind's), 32 x 32 images."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(0)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=1, vocab_size=len(vocab), max_position_embeddings=77,
                                        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                        pad_token_id=vocab["<|endoftext|>"]))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, projection_dim=1024, num_hidden_layers=1,
                                                            num_attention_heads=4, image_size=32,
                                                            intermediate_size=37, patch_size=8))
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                                attention_head_dim=(2, 4), class_embed_type="projection",
                                projection_class_embeddings_input_dim=2 * 1024, cross_attention_dim=32,
                                norm_num_groups=8, use_linear_projection=True)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=32)
    pipeline = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32), image_encoder=vision,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=1024),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), tokenizer=tokenizer,
        text_encoder=text, unet=unet, vae=vae,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1))
    pipeline.save_pretrained(str(folder / "unclip"))
    return folder / "unclip"


def test_the_image_embedding_is_the_weighted_pre_norm_mix(tmp_path):
    encoder = load_imagebind(save_tiny_imagebind(tmp_path / "imagebind_w3D.pth"))
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    cloud = torch.randn(1, 600, 3, generator=torch.Generator().manual_seed(1))
    _, pre = encoder.encode({"vision": images, "point": cloud}, prenorm=True)
    f = image_embedding(encoder, [("vision", images, 1.0), ("point", cloud, 3.0)])
    # official: weights / (sum + 1e-6), no normalisation of the inputs, points divided by point_scale 5
    torch.testing.assert_close(f, (1.0 * pre["vision"] + 3.0 * pre["point"] / 5) / (4 + 1e-6))
    stored = F.normalize(torch.randn(4, 1024, generator=torch.Generator().manual_seed(2)), dim=-1)
    blended = image_embedding(encoder, [("vision", images, 1.0)], (EmbeddingCache(stored), CacheSettings(2)))
    torch.testing.assert_close(blended.norm(), pre["vision"].norm() / (1 + 1e-6))  # the length is kept


def test_a_tiny_unclip_pipeline_turns_the_embedding_into_an_image(tmp_path):
    from PIL import Image

    folder = tiny_pipeline(tmp_path)
    pipeline = load_pipeline(folder)
    embedding = torch.randn(1, 1024, generator=torch.Generator().manual_seed(0))

    def draw(name: str, e: torch.Tensor) -> Image.Image:
        path = generate_image(pipeline, "a dog", e, tmp_path / name, generator=torch.Generator().manual_seed(0),
                              num_inference_steps=2)
        return Image.open(path).convert("RGB")

    first, again, other = draw("a.png", embedding), draw("b.png", embedding), draw("c.png", -3 * embedding)
    assert first.size == (32, 32)
    assert first.tobytes() == again.tobytes()  # seeded: deterministic
    assert first.tobytes() != other.tobytes()  # the embedding conditions the image
    with pytest.raises(LitAdapterError, match="1024-wide"):
        generate_image(pipeline, "a dog", torch.zeros(1, 8), tmp_path / "x.png")
    with pytest.raises(LitAdapterError, match="unCLIP pipeline folder not found"):
        load_pipeline(tmp_path / "none")


def test_generate_writes_the_output_image(stories260k_dir, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from tests.adapters.test_imagebind_llm import official_imagebind_llm, run
    from tests.helpers import write_image

    torch.save(official_imagebind_llm(), tmp_path / "7B.pth")
    encoder = save_tiny_imagebind(tmp_path / "imagebind_w3D.pth")
    folder = tiny_pipeline(tmp_path)
    args = ["generate", "--checkpoint_dir", str(stories260k_dir), "--adapter", str(tmp_path / "7B.pth"),
            "--encoder_weights", str(encoder), "--image", str(write_image(tmp_path / "a.png")), "--prompt",
            "a dog", "--max_new_tokens", "2", "--output_image", str(tmp_path / "out.png"), "--unclip_steps",
            "2", "--unclip_dir", str(folder)]
    code, _, err = run(args, capsys, monkeypatch)
    assert code == 0, err
    assert Image.open(tmp_path / "out.png").size == (32, 32) and "image written to" in err
    code, _, err = run([*args[:-2]], capsys, monkeypatch)  # without --unclip_dir
    assert code == 2 and "--unclip_dir" in err and len(err.strip().splitlines()) == 1
