"""The visual adapter: the V2 visual adapter / V1 global projection over the frozen tower, on a tiny registered CLIP."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lit_adapter.adapters.clip import ClipEncoder, build_clip_encoder
from lit_adapter.adapters.visual import VisualAdapter, VisualConfig
from lit_adapter.errors import LitAdapterError
from tests.adapters.helpers import official_clip_encode_image, tiny_visual

TINY_TOKENS = 1 + (32 // 8) ** 2  # class token + 4x4 patches


def tiny_config(**overrides) -> VisualConfig:
    return tiny_visual(**{"n_blocks": 2, **overrides})


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


def test_encoder_is_the_clip_submodule_type():
    adapter = VisualAdapter(tiny_config(), llama_dim=16)
    assert isinstance(adapter.clip, ClipEncoder)
    assert adapter.num_tokens == 3


def test_vit_block_equals_timms_block_with_the_same_weights():
    from timm.models.vision_transformer import Block

    from lit_adapter.adapters.visual import ViTBlock

    torch.manual_seed(0)
    ours = ViTBlock(32, heads=4, mlp_ratio=2.5)
    theirs = Block(32, 4, 2.5, qkv_bias=True, norm_layer=nn.LayerNorm)
    assert set(ours.state_dict()) == set(theirs.state_dict())  # official files load into either
    with torch.no_grad():
        for param in ours.parameters():
            param.normal_()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    torch.testing.assert_close(ours.double()(x), theirs.double()(x))
