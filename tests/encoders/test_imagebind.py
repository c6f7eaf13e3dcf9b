"""ImageBind in the official layout: key for key (huge and w3D counts), strict loading of a scaled-down file, and
every trunk against a forward written here from the documented formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_adapter.encoders import Encoder
from lit_adapter.encoders.imagebind import ImageBind, ImageBindConfig, load_imagebind
from lit_adapter.encoders.imagebind_point import farthest_points, group
from lit_adapter.errors import LitAdapterError
from tests.encoders.helpers import (
    HUGE,
    HUGE_POINT,
    SCALES,
    TINY,
    imagebind_shapes,
    imagebind_state,
    save_tiny_imagebind,
)

HEAD_DIMS = {"vision": 80, "text": 64, "audio": 64, "depth": 48, "thermal": 64, "imu": 64}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the encoder loaded from a tiny official-layout file, that file's state dict)."""
    path = save_tiny_imagebind(tmp_path_factory.mktemp("imagebind") / "imagebind_w3D.pth")
    return load_imagebind(path), torch.load(path, weights_only=True)


def shapes_of(model: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("point", [False, True])
def test_the_huge_layout_key_for_key_with_the_documented_counts(point):
    expected = imagebind_shapes(HUGE, HUGE_POINT if point else None)
    with torch.device("meta"):
        model = ImageBind(ImageBindConfig.from_state_dict({k: torch.empty(s) for k, s in expected.items()}))
    assert shapes_of(model) == expected
    # the documented totals: 1311 keys / 1,200,781,056 parameters + 5,934 buffer elements (w3D: 1476 / 1,223,558,400
    # + 7,217)
    elements = sum(math.prod(s) for s in expected.values())
    assert (len(expected), elements) == ((1476, 1_223_558_400 + 7_217) if point else (1311, 1_200_781_056 + 5_934))
    assert model.config.vision.heads == 16 and model.config.depth.heads == 8 and model.config.imu.heads == 8


def test_a_tiny_official_file_loads_strictly_and_is_an_encoder(tiny):
    model, state = tiny
    assert isinstance(model, Encoder) and model.output == "global" and model.embed_dim == 1024
    assert model.modalities == ("vision", "text", "audio", "depth", "thermal", "imu", "point")
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training  # frozen: always eval


def test_a_file_that_is_not_imagebind_or_does_not_fit_fails_with_one_line(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(LitAdapterError, match=r"other.pth: key 'modality_trunks.vision.blocks.0.norm_1.weight' "
                                              "missing"):
        load_imagebind(tmp_path / "other.pth")
    state = imagebind_state(point=None)
    state["modality_heads.imu.3.weight"] = torch.zeros(1024, 7)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(LitAdapterError) as err:
        load_imagebind(tmp_path / "bad.pth")
    assert "\n" not in str(err.value) and "bad.pth: does not fit ImageBind" in str(err.value)
    with pytest.raises(LitAdapterError, match="missing.pth: ImageBind weights not found"):
        load_imagebind(tmp_path / "missing.pth")


# ---- the documented forward, written from the state dict alone ----


def reference_trunk(state, m: str, tokens: torch.Tensor, mask=None) -> torch.Tensor:
    """Pre-norm blocks (LN eps 1e-6), q/k/v rows of in_proj in that order, bias_k/bias_v appended as one extra
    key/value position, erf GELU MLP."""
    width, heads = tokens.shape[-1], tokens.shape[-1] // HEAD_DIMS[m]
    x = tokens
    b = 0
    while f"modality_trunks.{m}.blocks.{b}.norm_1.weight" in state:
        p = lambda n, b=b: state[f"modality_trunks.{m}.blocks.{b}.{n}"]  # noqa: E731
        h = F.layer_norm(x, (width,), p("norm_1.weight"), p("norm_1.bias"), eps=1e-6)
        q, k, v = (h @ p("attn.in_proj_weight").T + p("attn.in_proj_bias")).chunk(3, dim=-1)
        if f"modality_trunks.{m}.blocks.{b}.attn.bias_k" in state:
            k = torch.cat([k, p("attn.bias_k").expand(x.shape[0], 1, -1)], dim=1)
            v = torch.cat([v, p("attn.bias_v").expand(x.shape[0], 1, -1)], dim=1)
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads)
        if mask is not None:
            scores = scores + mask
        out = (scores.softmax(-1) @ split(v)).transpose(1, 2).flatten(2)
        x = x + out @ p("attn.out_proj.weight").T + p("attn.out_proj.bias")
        h = F.layer_norm(x, (width,), p("norm_2.weight"), p("norm_2.bias"), eps=1e-6)
        x = x + F.gelu(h @ p("mlp.fc1.weight").T + p("mlp.fc1.bias")) @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
        b += 1
    return x


def with_cls(state, prefix: str, tokens: torch.Tensor, pos_key: str) -> torch.Tensor:
    cls = state[prefix + "cls_token"].expand(tokens.shape[0], -1, -1)
    return torch.cat([cls, tokens], dim=1) + state[prefix + pos_key]


def head(state, m: str, token: torch.Tensor, linear: str) -> torch.Tensor:
    w = token.shape[-1]
    out = F.layer_norm(token, (w,), state[f"modality_heads.{m}.0.weight"], state[f"modality_heads.{m}.0.bias"],
                       eps=1e-6) @ state[f"modality_heads.{m}.{linear}.weight"].T
    return F.normalize(out, dim=-1) * min(SCALES.get(m, 1.0), 100.0)


def reference_vision(state, images):
    """An image is two identical frames: the Conv3d over them is a Conv2d with the weight summed over time."""
    p = "modality_preprocessors.vision."
    weight = state[p + "rgbt_stem.proj.1.weight"].sum(2)
    tokens = F.conv2d(images, weight, stride=14).flatten(2).transpose(1, 2)
    x = with_cls(state, p, tokens, "pos_embedding_helper.pos_embed")
    x = F.layer_norm(x, (x.shape[-1],), state["modality_trunks.vision.pre_transformer_layer.0.weight"],
                     state["modality_trunks.vision.pre_transformer_layer.0.bias"], eps=1e-6)
    x = reference_trunk(state, "vision", x)
    out = F.layer_norm(x[:, 0], (x.shape[-1],), state["modality_heads.vision.0.weight"],
                       state["modality_heads.vision.0.bias"], eps=1e-6) @ state["modality_heads.vision.2.weight"].T
    return F.normalize(out, dim=-1)


def reference_patches(state, m: str, x, stem: str, stride: int):
    p = f"modality_preprocessors.{m}."
    tokens = F.conv2d(x, state[p + f"{stem}.proj.weight"], stride=stride).flatten(2).transpose(1, 2)
    tokens = F.layer_norm(tokens, (tokens.shape[-1],), state[p + f"{stem}.norm_layer.weight"],
                          state[p + f"{stem}.norm_layer.bias"], eps=1e-5)
    x = reference_trunk(state, m, with_cls(state, p, tokens, "pos_embedding_helper.pos_embed"))
    return head(state, m, x[:, 0], "2")


def reference_imu(state, x):
    """Window j of 8 samples, flattened channel-major: value (c, 8j + t) at position c * 8 + t."""
    windows = torch.stack([torch.stack([x[:, c, 8 * j + t] for c in range(6) for t in range(8)], dim=-1)
                           for j in range(250)], dim=1)
    p = "modality_preprocessors.imu."
    proj = state[p + "imu_stem.proj.weight"]
    tokens = F.layer_norm(windows @ proj.T, (proj.shape[0],), state[p + "imu_stem.norm_layer.weight"],
                          state[p + "imu_stem.norm_layer.bias"], eps=1e-5)
    x = reference_trunk(state, "imu", with_cls(state, p, tokens, "pos_embed"))
    return head(state, "imu", x[:, 0], "3")


def reference_text(state, ids):
    p = "modality_preprocessors.text."
    x = state[p + "token_embedding.weight"][ids] + state[p + "pos_embed"]
    x = reference_trunk(state, "text", x, mask=torch.full((77, 77), float("-inf")).triu(1))
    eot = x[torch.arange(ids.shape[0]), ids.argmax(-1)]  # the end-of-text token has the largest id
    h = "modality_heads.text.proj."
    out = F.layer_norm(eot, (eot.shape[-1],), state[h + "0.weight"], state[h + "0.bias"], eps=1e-6)
    out = out @ state[h + "1.weight"].T
    return F.normalize(out, dim=-1) * min(1 / 0.07, 100.0)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_every_trunk_computes_the_documented_forward(tiny):
    model, state = tiny
    images = randn(2, 3, 224, 224)
    audio = randn(2, 1, 128, 204, seed=1)
    maps = randn(2, 1, 224, 224, seed=2)
    imu = randn(2, 6, 2000, seed=3)
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[0, :5] = torch.tensor([49406, 320, 1929, 539, 49407])
    ids[1, :3] = torch.tensor([49406, 7, 49407])
    out = model.encode({"vision": images, "audio": audio, "depth": maps, "thermal": maps, "imu": imu, "text": ids})
    close = dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out["vision"], reference_vision(state, images), **close)
    torch.testing.assert_close(out["audio"], reference_patches(state, "audio", audio, "rgbt_stem", 10), **close)
    torch.testing.assert_close(out["depth"], reference_patches(state, "depth", maps, "depth_stem", 16), **close)
    torch.testing.assert_close(out["thermal"], reference_patches(state, "thermal", maps, "rgbt_stem", 16), **close)
    torch.testing.assert_close(out["imu"], reference_imu(state, imu), **close)
    torch.testing.assert_close(out["text"], reference_text(state, ids), **close)
    # normalised, then scaled: vision 1, text 1/0.07, audio 20, depth 5, thermal 10, imu 5
    for m, scale in {"vision": 1.0, **SCALES}.items():
        if m in out:
            torch.testing.assert_close(out[m].norm(dim=-1), torch.full((2,), scale), atol=1e-4, rtol=1e-5)
    again = model.encode({"vision": images})
    assert torch.equal(again["vision"], out["vision"])  # deterministic


def test_clip_lists_are_averaged_and_an_image_is_two_identical_frames(tiny):
    model, _ = tiny
    audio = randn(2, 3, 1, 128, 204, seed=4)
    clips = model.encode({"audio": audio})["audio"]
    each = torch.stack([model.encode({"audio": audio[:, s]})["audio"] for s in range(3)], dim=1)
    torch.testing.assert_close(clips, each.mean(1))  # the mean of the clip embeddings, not renormalised
    images = randn(1, 3, 224, 224, seed=5)
    video = images.unsqueeze(2).repeat(1, 1, 2, 1, 1)[:, None]  # one clip [B, 1, 3, 2, H, W]
    torch.testing.assert_close(model.encode({"vision": video})["vision"], model.encode({"vision": images})["vision"])
    post, pre = model.encode({"depth": randn(1, 1, 224, 224)}, prenorm=True)
    torch.testing.assert_close(post["depth"], 5 * F.normalize(pre["depth"], dim=-1))


def test_farthest_point_sampling_and_grouping_by_hand():
    line = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [10, 0, 0], [4, 0, 0], [6, 0, 0]]])
    # from point 0: the farthest is 10 (index 2); then the one farthest from {0, 10} is 4 or 6 -> 4 (dist 4) vs
    # 6 (dist 4): argmax takes the first, index 3; then 6 (dist 2 from 4) beats 1 (dist 1)
    assert farthest_points(line, 4).tolist() == [[0, 2, 3, 4]]
    groups, centres = group(line, 2, 2)
    assert centres.tolist() == [[[0.0, 0, 0], [10, 0, 0]]]
    assert sorted(groups[0, 0, :, 0].tolist()) == [0.0, 1.0]  # 0 and 1, relative to centre 0
    assert sorted(groups[0, 1, :, 0].tolist()) == [-4.0, 0.0]  # 10 and 6, relative to centre 10
    with pytest.raises(LitAdapterError, match="too small"):
        group(line, 8, 2)


def test_the_point_trunk_is_deterministic_normalised_and_order_free_after_the_first_point(tiny):
    model, _ = tiny
    cloud = randn(1, 600, 3, seed=6)
    out = model.encode({"point": cloud})["point"]
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(1))  # scale 1
    assert torch.equal(model.encode({"point": cloud})["point"], out)
    order = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(599, generator=torch.Generator()
                                                                             .manual_seed(0))])
    torch.testing.assert_close(model.encode({"point": cloud[:, order]})["point"], out, atol=1e-5, rtol=1e-4)


def test_a_model_without_the_point_trunk_refuses_points(tmp_path):
    model = load_imagebind(save_tiny_imagebind(tmp_path / "imagebind_huge.pth", point=False))
    assert "point" not in model.modalities and len(model.state_dict()) == len(imagebind_shapes(TINY, None))
    with pytest.raises(LitAdapterError, match="imagebind_w3D.pth"):
        model.encode({"point": torch.zeros(1, 600, 3)})
