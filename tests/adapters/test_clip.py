"""The frozen open_clip tower: local weights files, tags, one-line errors, image transforms (tiny registered CLIP)."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from lit_adapter.adapters import clip as clip_module
from lit_adapter.adapters.clip import TINY_CLIP_MODEL, build_clip_encoder, image_transform
from lit_adapter.adapters.visual import VisualAdapter, VisualConfig
from lit_adapter.errors import LitAdapterError
from tests.adapters.helpers import official_clip_encode_image, tiny_visual

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_config(**overrides) -> VisualConfig:
    return tiny_visual(**{"n_blocks": 2, **overrides})


def _reference_tiny_clip(**kwargs) -> nn.Module:
    torch.manual_seed(123)
    return clip_module.load_open_clip().create_model(TINY_CLIP_MODEL, **kwargs).eval()


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

    monkeypatch.setattr(clip_module.load_open_clip(), "create_model", offline)
    with pytest.raises(LitAdapterError) as info:
        build_clip_encoder(VisualConfig(clip_model="ViT-L/14"))
    assert calls[0][0] == "ViT-L-14" and calls[0][1]["pretrained"] == "openai"
    assert calls[0][1]["force_quick_gelu"] is True
    assert "local weights file" in str(info.value) and "\n" not in str(info.value)


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




# ---- shapes without open_clip, the lazy tower, --clip_weights, the channel order ----

@pytest.mark.parametrize("name", ["ViT-L-14", "ViT-B-32", "ViT-L-14-quickgelu", "RN50", TINY_CLIP_MODEL])
def test_model_shapes_read_from_the_config_files_are_open_clips(name):
    assert clip_module.clip_model_config(name) == clip_module.load_open_clip().get_model_config(name)


def test_the_lazy_tower_is_built_on_first_use_with_the_eager_towers_weights(tmp_path, images, clip_weights):
    eager = VisualAdapter(tiny_config(clip_pretrained=clip_weights), 64)
    with clip_module.clip_options(lazy=True):
        lazy = VisualAdapter(tiny_config(clip_pretrained=clip_weights), 64)
    lazy.load_state_dict({k: v for k, v in eager.state_dict().items() if not k.startswith("clip.")}, strict=False)
    assert isinstance(lazy.clip, clip_module.LazyClipEncoder) and not lazy.clip.built
    assert list(lazy.clip.parameters()) == [] and lazy.clip.embed_dim == eager.clip.embed_dim
    with torch.no_grad():
        torch.testing.assert_close(lazy(images), eager(images), atol=0, rtol=0)
    assert lazy.clip.built and not any(p.requires_grad for p in lazy.clip.parameters()) and not lazy.clip.training


def test_clip_weights_replace_the_configs_tower_weights(tmp_path, images, clip_weights):
    from_file = build_clip_encoder(tiny_config(clip_pretrained=clip_weights))
    with clip_module.clip_options(weights=clip_weights):
        replaced = build_clip_encoder(tiny_config(clip_pretrained=None))  # would be random without the option
    torch.testing.assert_close(replaced(images), from_file(images), atol=0, rtol=0)
    with pytest.raises(LitAdapterError, match=r"--clip_weights .*missing.pt: file not found"):
        with clip_module.clip_options(weights=tmp_path / "missing.pt"):
            pass


def test_clip_weights_keep_the_quickgelu_of_the_openai_tag(monkeypatch, tmp_path):
    calls = []

    def create(name, **kwargs):
        calls.append((name, kwargs))
        raise RuntimeError("stop here")

    monkeypatch.setattr(clip_module.load_open_clip(), "create_model", create)
    (tmp_path / "ViT-L-14.pt").write_bytes(b"")
    with clip_module.clip_options(weights=tmp_path / "ViT-L-14.pt"), pytest.raises(LitAdapterError):
        build_clip_encoder(VisualConfig(clip_model="ViT-L-14", clip_pretrained="openai"))
    assert calls[0][1]["pretrained"] is None and calls[0][1]["force_quick_gelu"] is True  # the file, not the tag


def test_bgr_channel_order_is_what_the_official_opencv_reading_feeds():
    import numpy as np

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8))
    # the official code: cv2.imread gives the BGR array, Image.fromarray takes it unchanged, then the CLIP transform
    as_official = Image.fromarray(np.ascontiguousarray(np.asarray(rgb)[..., ::-1]))
    reference = image_transform(TINY_CLIP_MODEL, train=False)(as_official)
    torch.testing.assert_close(image_transform(TINY_CLIP_MODEL, train=False, channel_order="bgr")(rgb), reference,
                               atol=0, rtol=0)
    assert VisualConfig(clip_model=TINY_CLIP_MODEL, channel_order="bgr").transform(train=False)(rgb).equal(reference)
    assert not image_transform(TINY_CLIP_MODEL, train=False)(rgb).equal(reference)
    with pytest.raises(LitAdapterError, match="channel_order"):
        VisualConfig(clip_model=TINY_CLIP_MODEL, channel_order="gbr")
