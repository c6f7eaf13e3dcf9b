"""The visual path: frozen open_clip tower + the V2 visual adapter / V1 global projection, on a tiny registered CLIP."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from lit_adapter.adapters import visual as visual_module
from lit_adapter.adapters.visual import (
    TINY_CLIP_MODEL,
    ClipEncoder,
    VisualAdapter,
    VisualConfig,
    build_clip_encoder,
    image_transform,
)
from lit_adapter.errors import LitAdapterError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_TOKENS = 1 + (32 // 8) ** 2  # class token + 4x4 patches


def tiny_config(**overrides) -> VisualConfig:
    fields = dict(clip_model=TINY_CLIP_MODEL, clip_pretrained=None, visual_len=3, n_blocks=2, block_heads=2)
    return VisualConfig(**{**fields, **overrides})


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def official_clip_encode_image(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LLaMA-Adapter V2's `clip_encode_image`: every token through ln_post and the visual projection."""
    x = visual.conv1(x).flatten(2).permute(0, 2, 1)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    for block in visual.transformer.resblocks:
        x = block(x)
    return visual.ln_post(x) @ visual.proj


def test_tokens_mode_shapes_and_clip_tokens_match_the_official_encoding(images):
    torch.manual_seed(0)
    adapter = VisualAdapter(tiny_config(), llama_dim=48)
    out = adapter(images)
    assert out.shape == (2, 3, 48)
    tokens = adapter.clip(images)
    assert tokens.shape == (2, TINY_TOKENS, 32)
    with torch.no_grad():
        expected = official_clip_encode_image(adapter.clip.visual, images)
        pooled = adapter.clip.visual(images)  # open_clip's own image embedding = projected class token
    torch.testing.assert_close(tokens, expected)
    torch.testing.assert_close(tokens[:, 0], pooled)
    torch.testing.assert_close(adapter.clip(images, all_tokens=False), pooled)


def test_tokens_mode_follows_the_official_forward_visual(images):
    torch.manual_seed(0)
    adapter = VisualAdapter(tiny_config(), llama_dim=48).eval()
    with torch.no_grad():
        feats = adapter.clip_proj_norm(adapter.clip_proj(official_clip_encode_image(adapter.clip.visual, images)))
        x = torch.cat([adapter.visual_query.weight.unsqueeze(0).repeat(2, 1, 1), feats], dim=1)  # queries first
        for block in adapter.visual_blocks:
            x = block(x)
        expected = adapter.visual_proj_norm(adapter.visual_proj(x[:, :3]))
        torch.testing.assert_close(adapter(images), expected)
    # The visual tokens depend on each image separately.
    single = adapter(images[:1])
    torch.testing.assert_close(single, adapter(images)[:1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapter(images)[0], adapter(images)[1])


def test_global_mode_is_one_token_from_the_clip_embedding(images):
    torch.manual_seed(0)
    adapter = VisualAdapter(tiny_config(mode="global", width=16), llama_dim=48)
    out = adapter(images)
    assert out.shape == (2, 1, 48)
    with torch.no_grad():
        embedding = adapter.clip.visual(images)
        first, _, second = adapter.visual_proj
        hidden = nn.functional.gelu(embedding @ first.weight.T + first.bias)
        expected = nn.functional.layer_norm(hidden @ second.weight.T + second.bias, (48,))
    torch.testing.assert_close(out[:, 0], expected, atol=1e-5, rtol=1e-5)
    assert first.weight.shape == (16, 32) and second.weight.shape == (48, 16)
    assert not hasattr(adapter, "visual_query")


def test_image_size_override_changes_the_token_count():
    torch.manual_seed(0)
    adapter = VisualAdapter(tiny_config(image_size=48), llama_dim=16)
    images = torch.randn(1, 3, 48, 48)
    assert adapter.clip(images).shape == (1, 1 + 6 * 6, 32)
    assert adapter(images).shape == (1, 3, 16)


def test_clip_is_frozen_stays_in_eval_and_the_rest_trains(images):
    torch.manual_seed(0)
    adapter = VisualAdapter(tiny_config(), llama_dim=16)
    adapter.train()
    assert adapter.training and adapter.visual_blocks[0].training
    assert not adapter.clip.training
    assert not any(module.training for module in adapter.clip.modules())
    adapter.clip.train()
    assert not adapter.clip.training
    adapter(images).pow(2).sum().backward()
    for name, param in adapter.named_parameters():
        if name.startswith("clip."):
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
    trainable = dict(adapter.trainable_parameters())
    assert trainable and not any(name.startswith("clip.") for name in trainable)
    assert set(trainable) == {n for n, p in adapter.named_parameters() if p.requires_grad}


def test_clip_gets_no_gradient_even_if_unfrozen_by_a_parent(images):
    torch.manual_seed(0)
    adapter = VisualAdapter(tiny_config(), llama_dim=16)
    adapter.requires_grad_(True)
    adapter(images).sum().backward()
    assert all(p.grad is None for p in adapter.clip.parameters())


def official_7b_count(embed: int, width: int, blocks: int, mlp_ratio: int, visual_len: int, dim: int) -> int:
    clip_proj = embed * width + width + 2 * width
    queries = visual_len * width
    hidden = mlp_ratio * width
    block = 2 * width + (3 * width * width + 3 * width) + (width * width + width) + 2 * width
    block += (width * hidden + hidden) + (hidden * width + width)
    visual_proj = width * dim + dim + 2 * dim
    return clip_proj + queries + blocks * block + visual_proj


def test_7b_visual_adapter_parameter_count_and_official_key_names():
    with torch.device("meta"):
        adapter = VisualAdapter(VisualConfig(), llama_dim=4096, load_clip=False)
    assert adapter.clip is None
    shapes = {name: tuple(p.shape) for name, p in adapter.named_parameters()}
    count = sum(p.numel() for p in adapter.parameters())
    assert count == official_7b_count(768, 768, 8, 4, 10, 4096) == 60_460_800
    block_keys = {
        f"visual_blocks.{i}.{part}.{kind}"
        for i in range(8)
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        for kind in ("weight", "bias")
    }
    official = {
        f"{module}.{kind}"
        for module in ("clip_proj", "clip_proj_norm", "visual_proj", "visual_proj_norm")
        for kind in ("weight", "bias")
    }
    assert set(shapes) == official | block_keys | {"visual_query.weight"}
    assert shapes["visual_query.weight"] == (10, 768)
    assert shapes["clip_proj.weight"] == (768, 768)
    assert shapes["visual_blocks.7.attn.qkv.weight"] == (2304, 768)
    assert shapes["visual_blocks.0.mlp.fc1.weight"] == (3072, 768)
    assert shapes["visual_proj.weight"] == (4096, 768)
    assert shapes["visual_proj_norm.weight"] == (4096,)
    assert adapter.visual_blocks[0].norm1.eps == 1e-5  # torch LayerNorm, as in the official timm 0.3.2 blocks


def test_7b_global_mode_parameter_count():
    with torch.device("meta"):
        adapter = VisualAdapter(VisualConfig(mode="global"), llama_dim=4096, load_clip=False)
    expected = (768 * 768 + 768) + (768 * 4096 + 4096) + 2 * 4096
    assert sum(p.numel() for p in adapter.parameters()) == expected == 3_748_608


def test_reset_parameters_after_meta_construction_matches_eager_init():
    config = tiny_config()
    torch.manual_seed(0)
    eager = VisualAdapter(config, llama_dim=16, load_clip=False)
    with torch.device("meta"):
        meta = VisualAdapter(config, llama_dim=16, load_clip=False)
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.reset_parameters()
    expected, actual = eager.state_dict(), meta.state_dict()
    assert list(expected) == list(actual)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)
    assert torch.equal(meta.clip_proj_norm.weight, torch.ones(32))
    meta.attach_encoder(build_clip_encoder(config))
    assert meta(torch.randn(1, 3, 32, 32)).shape == (1, 3, 16)


def test_forward_without_an_encoder_is_an_error():
    adapter = VisualAdapter(tiny_config(), llama_dim=16, load_clip=False)
    with pytest.raises(LitAdapterError, match="no CLIP encoder"):
        adapter(torch.randn(1, 3, 32, 32))
    assert adapter.project(torch.randn(2, TINY_TOKENS, 32)).shape == (2, 3, 16)


def test_wrong_image_shape_names_the_expected_size():
    adapter = VisualAdapter(tiny_config(), llama_dim=16)
    for bad in (torch.randn(1, 3, 64, 64), torch.randn(3, 32, 32), torch.randn(1, 1, 32, 32)):
        with pytest.raises(LitAdapterError, match=r"\[B, 3, 32, 32\]"):
            adapter(bad)


def test_frozen_tower_in_bf16_still_feeds_the_fp32_adapter(images):
    torch.manual_seed(0)
    adapter = VisualAdapter(tiny_config(), llama_dim=16)
    adapter.clip.to(torch.bfloat16)
    out = adapter(images)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def _reference_tiny_clip(**kwargs) -> nn.Module:
    torch.manual_seed(123)
    return visual_module.load_open_clip().create_model(TINY_CLIP_MODEL, **kwargs).eval()


@pytest.mark.parametrize("layout", ["full.pt", "full.safetensors", "visual_only.pt", "wrapped.pth"])
def test_local_weights_file_loads_the_image_tower(tmp_path, images, layout):
    reference = _reference_tiny_clip()
    state = reference.state_dict()
    path = tmp_path / layout
    if layout == "full.pt":
        torch.save(state, path)
    elif layout == "full.safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif layout == "visual_only.pt":
        torch.save(reference.visual.state_dict(), path)
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    torch.manual_seed(999)  # a different random init, so equality can only come from the file
    adapter = VisualAdapter(tiny_config(clip_pretrained=str(path)), llama_dim=16)
    with torch.no_grad():
        torch.testing.assert_close(adapter.clip(images), official_clip_encode_image(reference.visual, images))


def test_a_saved_encoder_round_trips(tmp_path, images):
    torch.manual_seed(1)
    first = VisualAdapter(tiny_config(), llama_dim=16)
    path = tmp_path / "clip.pt"
    torch.save(first.clip.state_dict(), path)  # keys "visual.*", as in a full open_clip state dict
    torch.manual_seed(2)
    second = VisualAdapter(tiny_config(clip_pretrained=str(path)), llama_dim=16)
    torch.testing.assert_close(second.clip(images), first.clip(images), rtol=0, atol=0)


def test_openai_torchscript_release_loads_with_quickgelu(tmp_path, images):
    reference = _reference_tiny_clip(force_quick_gelu=True)
    path = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        torch.jit.save(torch.jit.script(reference), str(path))
    encoder = build_clip_encoder(tiny_config(clip_pretrained=str(path)))
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), official_clip_encode_image(reference.visual, images))


def test_local_weights_resize_position_embeddings_for_another_image_size(tmp_path):
    reference = _reference_tiny_clip()
    path = tmp_path / "clip.pt"
    torch.save(reference.state_dict(), path)
    encoder = build_clip_encoder(tiny_config(clip_pretrained=str(path), image_size=48))
    assert encoder.visual.positional_embedding.shape == (1 + 36, 32)
    torch.testing.assert_close(encoder.visual.conv1.weight, reference.visual.conv1.weight)
    torch.testing.assert_close(encoder.visual.positional_embedding[0], reference.visual.positional_embedding[0])


def test_weights_of_another_architecture_are_a_one_line_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"visual.conv1.weight": torch.zeros(8, 3, 4, 4)}, path)
    with pytest.raises(LitAdapterError) as info:
        build_clip_encoder(tiny_config(clip_pretrained=str(path)))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(LitAdapterError, match="cannot read CLIP weights .*garbage.bin"):
        build_clip_encoder(tiny_config(clip_pretrained=str(garbage)))


def test_missing_weights_file_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nowhere" / "ViT-L-14.pt"
    with pytest.raises(LitAdapterError) as info:
        VisualAdapter(tiny_config(clip_pretrained=str(missing)), llama_dim=16)
    message = str(info.value)
    assert "not found" in message and str(missing) in message and "\n" not in message
    with pytest.raises(LitAdapterError, match="folder"):
        build_clip_encoder(tiny_config(clip_pretrained=str(tmp_path)))


def test_unknown_tag_lists_the_known_tags():
    with pytest.raises(LitAdapterError, match=r"neither an open_clip tag .*'openai'"):
        build_clip_encoder(VisualConfig(clip_pretrained="openia"))


def test_tag_download_uses_quickgelu_for_openai_and_failures_are_one_line(monkeypatch):
    calls = []

    def offline(name, **kwargs):
        calls.append((name, kwargs))
        raise RuntimeError("Failed to download weights for tag 'openai': no network\ndetails")

    monkeypatch.setattr(visual_module.open_clip, "create_model", offline)
    with pytest.raises(LitAdapterError) as info:
        build_clip_encoder(VisualConfig(clip_model="ViT-L/14"))
    assert calls[0][0] == "ViT-L-14" and calls[0][1]["pretrained"] == "openai"
    assert calls[0][1]["force_quick_gelu"] is True
    assert "local weights file" in str(info.value) and "\n" not in str(info.value)


def test_config_validation_and_round_trip():
    with pytest.raises(LitAdapterError, match="list_models"):
        VisualConfig(clip_model="ViT-Q-99")
    with pytest.raises(LitAdapterError, match="mode"):
        tiny_config(mode="patches")
    with pytest.raises(LitAdapterError, match="block_heads"):
        tiny_config(width=30, block_heads=4)
    with pytest.raises(LitAdapterError, match="visual_len"):
        tiny_config(visual_len=0)
    config = tiny_config(width=16, image_size=48)
    assert VisualConfig.from_dict(config.to_dict()) == config
    assert VisualConfig().embed_dim == 768 and VisualConfig().resolved_image_size == 224
    assert VisualConfig(mode="global").num_tokens == 1 and VisualConfig().num_tokens == 10
    with pytest.raises(LitAdapterError, match="unknown keys"):
        VisualConfig.from_dict({**config.to_dict(), "depth": 3})
    assert [f.name for f in dataclasses.fields(VisualConfig)][:3] == ["clip_model", "clip_pretrained", "mode"]


def _gray(width: int, height: int, value: int) -> Image.Image:
    return Image.new("RGB", (width, height), (value, value, value))


@pytest.mark.parametrize("train", [True, False])
def test_image_transform_sizes_and_normalisation(train):
    transform = image_transform(TINY_CLIP_MODEL, train=train)
    out = transform(_gray(50, 40, 128))
    assert out.shape == (3, 32, 32)
    expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(OPENAI_MEAN, OPENAI_STD, strict=True)])
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)
    assert image_transform(TINY_CLIP_MODEL, train=train, image_size=48)(_gray(60, 90, 10)).shape == (3, 48, 48)
    assert image_transform("ViT-L-14", train=train)(_gray(300, 260, 0)).shape == (3, 224, 224)


def test_train_transform_is_the_official_random_resized_crop():
    from torchvision.transforms import InterpolationMode, RandomResizedCrop

    crops = [t for t in image_transform("ViT-L/14", train=True).transforms if isinstance(t, RandomResizedCrop)]
    assert len(crops) == 1
    crop = crops[0]
    assert crop.size == (224, 224) and crop.scale == (0.9, 1.0)
    assert crop.interpolation == InterpolationMode.BICUBIC


def test_eval_transform_center_crops_the_shortest_side():
    # Left half black, right half white: the 32px centre crop of the resized 64x32 image is half and half.
    image = Image.new("RGB", (100, 50), (0, 0, 0))
    image.paste((255, 255, 255), (50, 0, 100, 50))
    out = image_transform(TINY_CLIP_MODEL, train=False)(image)
    pixels = out[0] * OPENAI_STD[0] + OPENAI_MEAN[0]
    assert pixels[:, :14].max() < 0.05 and pixels[:, -14:].min() > 0.95
    with pytest.raises(LitAdapterError, match="list_models"):
        image_transform("not-a-model", train=False)


def test_encoder_is_the_clip_submodule_type():
    adapter = VisualAdapter(tiny_config(), llama_dim=16)
    assert isinstance(adapter.clip, ClipEncoder)
    assert adapter.num_tokens == 3
