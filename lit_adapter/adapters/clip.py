"""The frozen open_clip image tower: model names, weights (open_clip tags or local files), image transforms.

open_clip and timm (and torchvision through them) are imported on first use, not with this module: text-only users
of `lit_adapter.adapters` never load them. A model's shape (embedding width, image size) is read from open_clip's
own config file without importing open_clip. `load_open_clip()` returns open_clip with the tiny test tower
(`TINY_CLIP_MODEL`) registered; code that builds that tower through open_clip directly gets open_clip from there.

`clip_options(weights=PATH, lazy=True)` (what `generate` and `chat` use around loading): every tower built inside
takes its weights from the local file PATH instead of `clip_pretrained`, and is built only when the first image
arrives (`LazyClipEncoder`), so text-only generation never imports open_clip, builds the tower or fetches weights.

Channel order: the official V2 code reads images with OpenCV (`cv2.imread`, BGR) and hands the array to PIL
unchanged, so its released weights saw blue where CLIP expects red; `image_transform(..., channel_order="bgr")`
feeds a model those weights were trained for the same way (the official V2 files default to it, ours to rgb).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
from torch import nn

from lit_adapter.errors import LitAdapterError, first_line

if TYPE_CHECKING:
    from lit_adapter.adapters.visual import VisualConfig

TINY_CLIP_MODEL = "lit-adapter-tiny-vit"
_TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "head_width": 16, "layers": 2},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
CHANNEL_ORDERS = ("rgb", "bgr")


@dataclasses.dataclass(frozen=True)
class ClipOptions:
    """How towers are built inside `clip_options`: `weights` (a local file) replaces every config's
    `clip_pretrained`; `lazy` defers the build to the first image."""

    weights: Optional[Path] = None
    lazy: bool = False


_options: ContextVar[Optional[ClipOptions]] = ContextVar("clip_options", default=None)


@contextmanager
def clip_options(weights: Optional[Path] = None, lazy: bool = False) -> Iterator[ClipOptions]:
    """Within the block, CLIP towers take their weights from the local file `weights` (when given) and, with `lazy`,
    are built on first use (see the module docstring). A missing file fails here, in one line."""
    if weights is not None:
        weights = Path(weights).expanduser()
        if not weights.is_file():
            raise LitAdapterError(f"--clip_weights {weights}: file not found (a local open_clip or OpenAI CLIP "
                                  "weights file: .pt, .pth, .bin, .safetensors)")
    options = ClipOptions(weights, lazy)
    token = _options.set(options)
    try:
        yield options
    finally:
        _options.reset(token)


def load_open_clip() -> ModuleType:
    """open_clip, imported on first use, with the tiny test architecture registered."""
    import open_clip

    _register_tiny_clip(open_clip)
    return open_clip


def _register_tiny_clip(open_clip: ModuleType) -> None:
    """Adds the tiny test architecture to open_clip's model registry (kept across open_clip's own rescans)."""
    if TINY_CLIP_MODEL in open_clip.list_models():
        return
    registry = getattr(open_clip.factory, "_MODEL_CONFIGS", None)
    if isinstance(registry, dict):
        registry[TINY_CLIP_MODEL] = _TINY_CLIP_CONFIG
        return
    import json
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="lit-adapter-open-clip-"))
    (folder / f"{TINY_CLIP_MODEL}.json").write_text(json.dumps(_TINY_CLIP_CONFIG))
    open_clip.add_model_config(folder)


def _clip_name(clip_model: str) -> str:
    return clip_model.replace("/", "-")  # OpenAI spells it "ViT-L/14", open_clip "ViT-L-14"


def _config_file(name: str) -> Optional[dict[str, Any]]:
    """open_clip's own config file for a built-in model name, read without importing open_clip (seconds saved)."""
    if name == TINY_CLIP_MODEL:
        return json.loads(json.dumps(_TINY_CLIP_CONFIG))
    spec = importlib.util.find_spec("open_clip")  # finds the package without running it
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "model_configs" / f"{name}.json"
        if path.is_file():
            config = json.loads(path.read_text())
            if all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):  # as open_clip's own scan
                return config
    return None


def clip_model_config(clip_model: str) -> dict[str, Any]:
    """open_clip's architecture config for a model name, without building anything."""
    config = _config_file(_clip_name(clip_model)) if ":" not in clip_model else None
    if config is None and ":" not in clip_model:
        config = load_open_clip().get_model_config(_clip_name(clip_model))  # a config registered at run time
    if config is None:
        raise LitAdapterError(
            f"unknown open_clip model {clip_model!r}; list the valid names with "
            '`python -c "import open_clip; print(open_clip.list_models())"`'
        )
    return config


def clip_embed_dim(clip_model: str) -> int:
    """Width of the CLIP image features (after the visual projection): 768 for ViT-L-14."""
    return int(clip_model_config(clip_model)["embed_dim"])


def clip_image_size(clip_model: str) -> int:
    size = clip_model_config(clip_model)["vision_cfg"].get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _is_pretrained_tag(clip_model: str, value: str) -> bool:
    return bool(load_open_clip().get_pretrained_cfg(_clip_name(clip_model), value))



def image_transform(
    clip_model: str, train: bool, image_size: Optional[int] = None, clip_pretrained: Optional[str] = None,
    channel_order: str = "rgb",
) -> Callable:
    """PIL image -> normalised [3, S, S] tensor for `clip_model` (no model is built).

    Train: RandomResizedCrop(S, scale=(0.9, 1.0), bicubic) + ToTensor + CLIP mean/std (the official V2 recipe).
    Eval: open_clip's own eval transform (resize shortest side + center crop + normalise). Mean/std are OpenAI CLIP's
    unless `clip_pretrained` names an open_clip tag that uses other statistics. `channel_order` "bgr" swaps red and
    blue first, as the official V2 code's OpenCV reading does (see the module docstring).
    """
    if channel_order not in CHANNEL_ORDERS:
        raise LitAdapterError(f"visual config: channel_order must be one of {list(CHANNEL_ORDERS)}, got "
                              f"{channel_order!r}")
    transform = _clip_transform(clip_model, train, image_size, clip_pretrained)
    if channel_order == "bgr":
        return _SwapRedBlue(transform)
    return transform


class _SwapRedBlue:
    """Swaps an RGB image's red and blue channels, then applies `transform`: what reading with cv2.imread (BGR) and
    handing the array to PIL unchanged does. Every step after it works per channel, so swapping first is exact."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> torch.Tensor:
        from PIL import Image

        red, green, blue = image.convert("RGB").split()
        return self.transform(Image.merge("RGB", (blue, green, red)))


def _clip_transform(clip_model: str, train: bool, image_size: Optional[int], clip_pretrained: Optional[str]):
    open_clip = load_open_clip()
    from open_clip.transform import AugmentationCfg, PreprocessCfg, merge_preprocess_dict

    size = image_size or clip_image_size(clip_model)
    preprocess = dataclasses.asdict(PreprocessCfg())
    if clip_pretrained and _is_pretrained_tag(clip_model, clip_pretrained):
        preprocess = merge_preprocess_dict(
            preprocess, open_clip.get_pretrained_cfg(_clip_name(clip_model), clip_pretrained)
        )
    common = dict(mean=preprocess["mean"], std=preprocess["std"], fill_color=preprocess["fill_color"])
    if train:
        return open_clip.image_transform(size, is_train=True, aug_cfg=AugmentationCfg(scale=(0.9, 1.0)), **common)
    return open_clip.image_transform(
        size,
        is_train=False,
        resize_mode=preprocess["resize_mode"],
        interpolation=preprocess["interpolation"],
        **common,
    )


class ClipEncoder(nn.Module):
    """The frozen open_clip image tower (`visual`, named as in open_clip's and OpenAI's state dicts).

    It stays in eval mode whatever its parent's mode, gets no gradients, and runs under no_grad.
    """

    def __init__(self, visual: nn.Module, clip_model: str, embed_dim: int, image_size: int) -> None:
        super().__init__()
        self.visual = visual
        self.clip_model = clip_model
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> ClipEncoder:
        return super().train(False)

    # the encoder interface (lit_adapter.encoders.Encoder): one modality; every token or the global vector
    modalities = ("vision",)
    tokens = True

    @property
    def output(self) -> str:
        return "tokens" if self.tokens else "global"

    def encode(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"vision": self(inputs["vision"], all_tokens=self.tokens)}

    def _check_images(self, images: torch.Tensor) -> None:
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise LitAdapterError(
                f"images must be a [B, 3, {self.image_size}, {self.image_size}] tensor for open_clip model "
                f"{self.clip_model!r} (make them with lit_adapter.adapters.clip.image_transform), "
                f"got shape {list(images.shape)}"
            )

    @torch.no_grad()
    def forward(self, images: torch.Tensor, all_tokens: bool = True) -> torch.Tensor:
        """[B, 3, S, S] -> all tokens [B, 1 + grid^2, embed_dim] (class token first) or the global [B, embed_dim]."""
        self._check_images(images)
        images = images.to(self._dtype())
        if not all_tokens:
            return self.visual(images)
        from open_clip.transformer import VisionTransformer

        if not isinstance(self.visual, VisionTransformer) or self.visual.attn_pool is not None:
            raise LitAdapterError(
                f"visual mode 'tokens' needs an open_clip ViT image tower without attentional pooling; "
                f"{self.clip_model!r} has none, use mode 'global' or another clip_model"
            )
        # The last block's output with ln_post applied to every token, then the visual projection (official V2).
        out = self.visual.forward_intermediates(
            images,
            indices=1,
            normalize_intermediates=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        tokens = torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)
        return tokens @ self.visual.proj if self.visual.proj is not None else tokens

    def _dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype


def _resolve_pretrained(clip_model: str, pretrained: Optional[str]) -> tuple[Optional[str], Optional[Path]]:
    """(open_clip tag, local file): at most one is set."""
    if pretrained is None:
        return None, None
    if _is_pretrained_tag(clip_model, pretrained):
        return pretrained, None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return None, path
    if path.is_dir():
        raise LitAdapterError(f"CLIP weights {path} is a folder; set clip_pretrained to the weights file inside it")
    if os.sep in pretrained or "/" in pretrained or path.suffix in _WEIGHT_SUFFIXES:
        raise LitAdapterError(f"CLIP weights file not found: {path} (check clip_pretrained)")
    tags = load_open_clip().list_pretrained_tags_by_model(_clip_name(clip_model))
    raise LitAdapterError(
        f"clip_pretrained {pretrained!r} is neither an open_clip tag for {clip_model!r} (tags: {tags or 'none'}) "
        "nor an existing weights file"
    )


class _RandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextmanager
def _quiet_random_init(active: bool) -> Iterator[None]:
    """Hides open_clip's "initialized randomly" notice where that is intended: weights from a local file loaded
    just after, or the tiny test tower."""
    notice = _RandomInitNotice()
    if active:
        logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)


class LazyClipEncoder(ClipEncoder):
    """A `ClipEncoder` whose tower is built (and its weights read) when the first image arrives, on the device and
    in the dtype the encoder has been moved to by then; until then it holds no parameters."""

    def __init__(self, config: VisualConfig, embed_dim: int, image_size: int,
                 device: Optional[torch.device | str] = None, weights: Optional[Path] = None) -> None:
        super().__init__(None, config.clip_model, embed_dim, image_size)  # type: ignore[arg-type]
        self.config, self.weights = config, weights
        # follows .to(device, dtype) calls, so the tower is built where the eager one would be
        self.register_buffer("anchor", torch.empty(0, device=device or "cpu"), persistent=False)

    @property
    def built(self) -> bool:
        return self.visual is not None

    def build(self) -> None:
        if self.visual is None:
            with torch.inference_mode(False):  # first use is often inside inference mode: make plain parameters
                encoder = _build_clip_encoder(self.config, self.anchor.device, self.weights)
                self.visual = encoder.visual.to(self.anchor.dtype)
            self.requires_grad_(False)
            self.train(False)

    def forward(self, images: torch.Tensor, all_tokens: bool = True) -> torch.Tensor:
        self.build()
        return super().forward(images, all_tokens)


def build_clip_encoder(config: VisualConfig, device: Optional[torch.device | str] = None) -> ClipEncoder:
    """Builds the frozen image tower on `device` (default CPU, even inside a meta-device context) with its weights;
    inside `clip_options` with the weights given there, and on first use when it says `lazy`."""
    options = _options.get() or ClipOptions()
    if options.lazy:
        return LazyClipEncoder(config, clip_embed_dim(config.clip_model), config.resolved_image_size, device,
                               options.weights)
    return _build_clip_encoder(config, device, options.weights)


def _build_clip_encoder(config: VisualConfig, device: Optional[torch.device | str] = None,
                        weights: Optional[Path] = None) -> ClipEncoder:
    """The tower of `config`; `weights`, a local file, replaces its `clip_pretrained` (a tag's activation kept)."""
    open_clip = load_open_clip()
    name = _clip_name(config.clip_model)
    tag, local = _resolve_pretrained(config.clip_model, config.clip_pretrained)
    # OpenAI's releases (the "openai" tag, TorchScript archives) were trained with QuickGELU.
    quick_gelu = bool(tag and open_clip.get_pretrained_cfg(name, tag).get("quick_gelu"))
    if weights is not None:  # the same weights from a local file: the architecture the tag implies stays
        tag, local = None, Path(weights)
    if local is not None:
        from lit_adapter.adapters.clip_weights import is_torchscript

        quick_gelu = quick_gelu or is_torchscript(local)
    with torch.device(device or "cpu"), _quiet_random_init(local is not None or name == TINY_CLIP_MODEL):
        try:
            model = open_clip.create_model(
                name,
                pretrained=tag,
                device=device or "cpu",
                force_quick_gelu=quick_gelu,
                force_image_size=config.image_size,
                pretrained_text=False,
            )
        except (RuntimeError, OSError) as err:
            reason = first_line(err)
            if tag is None:
                raise LitAdapterError(f"cannot build open_clip model {name!r}: {reason}") from err
            raise LitAdapterError(
                f"cannot fetch open_clip weights {name!r}/{tag!r} ({reason}); without internet, pass a local "
                "weights file: --clip_weights PATH (generate, chat) or the config key visual.clip_pretrained: PATH"
            ) from err
        if local is not None:
            from lit_adapter.adapters.clip_weights import load_image_tower

            load_image_tower(model, local, config.clip_model)
    return ClipEncoder(model.visual, config.clip_model, clip_embed_dim(name), config.resolved_image_size)

