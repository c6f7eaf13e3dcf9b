"""Position-table interpolation of the vision (and depth) trunk for other input sizes, as the official ImageBind
does it: against torch's bicubic interpolation called the official way and the documented forward of
tests/encoders/test_imagebind.py fed the hand-interpolated table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_adapter.encoders import imagebind
from lit_adapter.encoders.imagebind import interpolate_pos_embed, load_imagebind, resize_grid
from lit_adapter.errors import LitAdapterError
from tests.encoders.helpers import save_tiny_imagebind
from tests.encoders.test_imagebind import reference_patches, reference_vision

VISION_POS = "modality_preprocessors.vision.pos_embedding_helper.pos_embed"
DEPTH_POS = "modality_preprocessors.depth.pos_embedding_helper.pos_embed"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_imagebind(tmp_path_factory.mktemp("imagebind") / "imagebind_huge.pth", point=False)
    return load_imagebind(path), torch.load(path, weights_only=True)


def official_interpolation(pos_embed: torch.Tensor, patches: int) -> torch.Tensor:
    """By hand, as the official code states it: keep the class token; view the other N rows as a sqrt(N) x sqrt(N)
    grid; bicubic with scale factor sqrt(patches / N)."""
    n = pos_embed.shape[1] - 1
    side, dim = int(math.sqrt(n)), pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=math.sqrt(patches / n), mode="bicubic")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_at_the_stored_size_nothing_changes(tiny, monkeypatch):
    model, state = tiny
    table = model.modality_preprocessors["vision"].pos_embedding_helper.pos_embed
    assert interpolate_pos_embed(table, (16, 16)) is table  # 224 px: 16 x 16 patches, the very table
    images = randn(2, 3, 224, 224)
    out = model.encode({"vision": images})["vision"]
    monkeypatch.setattr(imagebind, "interpolate_pos_embed", lambda pos_embed, grid: pos_embed)
    assert torch.equal(model.encode({"vision": images})["vision"], out)  # bit for bit the path without it
    torch.testing.assert_close(out, reference_vision(state, images), atol=2e-5, rtol=1e-4)


def test_another_size_uses_the_official_bicubic_table(tiny):
    model, state = tiny
    table = state[VISION_POS]
    hand = official_interpolation(table, 20 * 20)  # 280 px: 20 x 20 patches
    assert hand.shape == (1, 401, table.shape[-1])
    torch.testing.assert_close(hand[:, 0], table[:, 0], rtol=0, atol=0)  # the class token's position kept
    torch.testing.assert_close(interpolate_pos_embed(table, (20, 20)), hand, rtol=0, atol=1e-7)
    images = randn(2, 3, 280, 280, seed=1)
    out = model.encode({"vision": images})["vision"]
    assert out.shape == (2, 1024)
    torch.testing.assert_close(out, reference_vision({**state, VISION_POS: hand}, images), atol=2e-5, rtol=1e-4)
    # depth maps follow the same rule (14 x 14 patches of 16 px; 448 px: 28 x 28)
    maps = randn(1, 1, 448, 448, seed=2)
    hand = official_interpolation(state[DEPTH_POS], 28 * 28)
    torch.testing.assert_close(model.encode({"depth": maps})["depth"],
                               reference_patches({**state, DEPTH_POS: hand}, "depth", maps, "depth_stem", 16),
                               atol=2e-5, rtol=1e-4)


def test_a_non_square_image_gets_the_table_resized_to_its_own_grid(tiny):
    model, state = tiny
    table = state[VISION_POS]
    grid = table[:, 1:].reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    hand = F.interpolate(grid, size=(16, 24), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 16 * 24, -1)
    images = randn(1, 3, 224, 336, seed=3)
    torch.testing.assert_close(model.encode({"vision": images})["vision"],
                               reference_vision({**state, VISION_POS: torch.cat([table[:, :1], hand], 1)}, images),
                               atol=2e-5, rtol=1e-4)


def test_resizing_a_table_to_its_own_grid_is_the_identity(tiny):
    _, state = tiny
    patches = state[VISION_POS][:, 1:]
    torch.testing.assert_close(resize_grid(patches, (16, 16)), patches, rtol=0, atol=1e-6)
    half = resize_grid(patches.to(torch.bfloat16), (16, 16))
    assert half.dtype == torch.bfloat16 and torch.equal(half, patches.to(torch.bfloat16))


def test_a_clip_of_more_than_one_temporal_patch_is_refused(tiny):
    model, _ = tiny
    with pytest.raises(LitAdapterError) as err:
        model.encode({"vision": randn(1, 1, 3, 4, 224, 224)})  # one clip of 4 frames: 2 temporal patches
    assert "\n" not in str(err.value) and "clips of 2 frames (one temporal patch), got 4" in str(err.value)
