"""ImageBind-Huge, natively, in the official state-dict layout (`imagebind_huge.pth`; `imagebind_w3D.pth` adds the
Point-BERT trunk of `imagebind_point.py`), so the released files load key for key and strictly.

Per modality m: preprocessor (stem, class token, learned positions) -> trunk (pre-norm transformer blocks of
`torch.nn.MultiheadAttention`, sequence-first as in the official code) -> head (LayerNorm, class or EOT token,
bias-free Linear to the joint space) -> postprocessor (L2 normalise, then a fixed or learned logit scale clipped at
100). An input of five or more dimensions is a list of clips `[B, S, ...]`: every clip is embedded and the S
embeddings averaged (audio `[B, 3, 1, 128, 204]`, video `[B, 15, 3, 2, 224, 224]`).

Images (and depth and thermal maps) of another size than 224 px get the learned position table interpolated to their
patch grid, bicubically, as the official code does (`interpolate_pos_embed`).

The encoder is frozen and always in eval mode, where drop path and dropout are identities (none is built).
The architecture is read from the weights' shapes (`ImageBindConfig.from_state_dict`); head widths follow the
official head sizes (vision 80, depth 48, the others 64), so scaled-down files in the same layout load the same way.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lit_adapter.encoders.imagebind_point import PointConfig, PointTrunk, point_config
from lit_adapter.errors import LitAdapterError, first_line

MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu")
HEAD_DIMS = {"vision": 80, "text": 64, "audio": 64, "depth": 48, "thermal": 64, "imu": 64}
BIAS_KV = ("audio", "depth", "thermal", "imu")  # these trunks append one learned key/value position
STEM_NAMES = {"vision": "rgbt_stem", "audio": "rgbt_stem", "depth": "depth_stem", "thermal": "rgbt_stem"}
# the fixed postprocessor scales (text's is learned, initialised at 1/0.07; vision has none)
LOGIT_SCALES = {"audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0, "point": 1.0}
MAX_LOGIT_SCALE = 100.0
# input geometry of the official stems
IMAGE_SIZE, VISION_PATCH, FRAMES = 224, 14, 2
MEL_BINS, AUDIO_FRAMES, AUDIO_KERNEL, AUDIO_STRIDE = 128, 204, 16, 10
DEPTH_PATCH = 16
IMU_CHANNELS, IMU_LENGTH, IMU_KERNEL = 6, 2000, 8


@dataclasses.dataclass(frozen=True)
class TrunkSize:
    width: int
    depth: int
    heads: int


@dataclasses.dataclass(frozen=True)
class ImageBindConfig:
    """Widths and depths of every trunk (defaults: ImageBind-Huge); `point` set for the w3D variant."""

    embed_dim: int = 1024
    vision: TrunkSize = TrunkSize(1280, 32, 16)
    text: TrunkSize = TrunkSize(1024, 24, 16)
    audio: TrunkSize = TrunkSize(768, 12, 12)
    depth: TrunkSize = TrunkSize(384, 12, 8)
    thermal: TrunkSize = TrunkSize(768, 12, 12)
    imu: TrunkSize = TrunkSize(512, 6, 8)
    vocab_size: int = 49408
    context_length: int = 77
    point: Optional[PointConfig] = None

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], source: str = "ImageBind weights") -> ImageBindConfig:
        def shape(key: str) -> torch.Size:
            if key not in state:
                raise LitAdapterError(f"{source}: key {key!r} missing: not an ImageBind state dict")
            return state[key].shape

        trunks = {}
        for m in MODALITIES:
            width = shape(f"modality_trunks.{m}.blocks.0.norm_1.weight")[0]
            trunks[m] = TrunkSize(width, count_blocks(state, f"modality_trunks.{m}.blocks."), width // HEAD_DIMS[m])
        vocab, _ = shape("modality_preprocessors.text.token_embedding.weight")
        context = shape("modality_preprocessors.text.pos_embed")[1]
        embed = shape("modality_heads.vision.2.weight")[0]
        points = point_config(state, source) if any(k.startswith("point_trunk.") for k in state) else None
        return cls(embed, vocab_size=vocab, context_length=context, point=points, **trunks)

    @property
    def modalities(self) -> tuple[str, ...]:
        return MODALITIES + (("point",) if self.point is not None else ())


def count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m[1] for key in state if (m := pattern.match(key))})


# ---- the shared transformer ----


class Mlp(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    """x += attn(LN1(x), mask); x += mlp(LN2(x)), on sequence-first [L, B, D]."""

    def __init__(self, width: int, heads: int, bias_kv: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, bias=True, add_bias_kv=bias_kv)
        self.norm_1, self.norm_2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    """`pre_transformer_layer` (vision: LayerNorm; else identity) then the blocks; [B, L, D] in and out."""

    def __init__(self, size: TrunkSize, pre_norm: bool, bias_kv: bool) -> None:
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(size.width, eps=1e-6) if pre_norm else nn.Identity())
        self.blocks = nn.Sequential(*(Block(size.width, size.heads, bias_kv) for _ in range(size.depth)))

    def forward(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.pre_transformer_layer(tokens).transpose(0, 1)  # the official trunk is sequence-first
        for block in self.blocks:
            x = block(x, mask)
        return x.transpose(0, 1)


# ---- preprocessors (stems) ----


class RepeatFrames(nn.Module):
    """An image [B, C, H, W] becomes a clip of two identical frames [B, C, 2, H, W]; a clip passes unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(2).repeat(1, 1, FRAMES, 1, 1) if x.ndim == 4 else x


class PatchStem(nn.Module):
    """A convolution to patch tokens [B, L, D], then (audio, depth, thermal) a LayerNorm."""

    def __init__(self, proj: nn.Module, norm_width: Optional[int]) -> None:
        super().__init__()
        self.proj = proj
        self.norm_layer = nn.LayerNorm(norm_width) if norm_width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)  # row-major over (t, h, w) / (mel, time)
        return self.norm_layer(x) if self.norm_layer is not None else x


class PosEmbed(nn.Module):
    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, width))


class PatchPreprocessor(nn.Module):
    """Stem tokens with a class token prepended, plus learned positions (vision, audio, depth, thermal).

    `patch` (vision, depth, thermal): the stem's patch size; an input whose patch grid holds another number of
    patches than the stored table gets the table interpolated to its grid (`interpolate_pos_embed`). Audio
    (None) has a fixed [128, 204] input."""

    def __init__(self, stem_name: str, stem: PatchStem, patches: int, width: int,
                 patch: Optional[int] = None) -> None:
        super().__init__()
        self.stem_name = stem_name
        self.patch = patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        setattr(self, stem_name, stem)
        self.pos_embedding_helper = PosEmbed(patches + 1, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = getattr(self, self.stem_name)(x)
        pos_embed = self.pos_embedding_helper.pos_embed
        if self.patch is not None:
            grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
            if tokens.shape[1] != grid[0] * grid[1]:
                raise LitAdapterError(f"ImageBind vision takes clips of {FRAMES} frames (one temporal patch), got "
                                      f"{x.shape[2]}: the position table has no time axis")
            pos_embed = interpolate_pos_embed(pos_embed, grid)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + check_tokens(pos_embed, tokens)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The official rule: the class token's position kept, the patches' table [1, 1 + n * n, D] (one temporal patch)
    resized bicubically over its n x n grid to `grid`, only when the patch count differs (never at 224 px).

    The official code resizes by the factor sqrt(patches wanted / stored), so only to square grids; this resizes to
    the input's own grid (the same result for a square one, and non-square images work too)."""
    if pos_embed.shape[1] - 1 == grid[0] * grid[1]:
        return pos_embed
    return torch.cat([pos_embed[:, :1], resize_grid(pos_embed[:, 1:], grid)], dim=1)


def resize_grid(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1, n * n, D] laid out row-major over an n x n grid -> [1, h * w, D] by bicubic interpolation (torch's,
    align_corners False), computed in float32 as the official code does for bfloat16."""
    side = math.isqrt(table.shape[1])
    if side * side != table.shape[1]:
        raise LitAdapterError(f"ImageBind position table of {table.shape[1]} patches is not a square grid: it "
                              "cannot be interpolated; give inputs of the size it was trained on")
    square = table.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(table.dtype)


class ImuPreprocessor(nn.Module):
    """[B, 6, 2000] -> 250 windows of 8 samples, each flattened channel-major (c * 8 + t) to 48 -> Linear + LN."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, IMU_LENGTH // IMU_KERNEL + 1, width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.imu_stem = PatchStem(nn.Linear(IMU_CHANNELS * IMU_KERNEL, width, bias=False), width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows = x.unfold(-1, IMU_KERNEL, IMU_KERNEL).permute(0, 2, 1, 3).flatten(2)  # [B, 250, 6 * 8]
        tokens = self.imu_stem.norm_layer(self.imu_stem.proj(windows))
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + check_tokens(self.pos_embed, tokens)


class TextPreprocessor(nn.Module):
    """Token embeddings plus learned positions (no class token); the causal mask is part of the state dict."""

    def __init__(self, vocab_size: int, context_length: int, width: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.register_buffer("mask", torch.full((context_length, context_length), float("-inf")).triu(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + check_tokens(self.pos_embed, ids)


def check_tokens(pos_embed: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    if tokens.shape[1] != pos_embed.shape[1]:
        raise LitAdapterError(f"ImageBind input gives {tokens.shape[1]} tokens, the weights hold positions for "
                              f"{pos_embed.shape[1]}: preprocess the input with lit_adapter.media")
    return pos_embed


# ---- heads and postprocessors ----


class SelectToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class SelectEOSAndProject(nn.Module):
    """Text head: the token at the end-of-text position (the largest id of each row), then LN + Linear."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(width, eps=1e-6), nn.Linear(width, embed_dim, bias=False))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)])


class Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


class LogitScale(nn.Module):
    """x * min(exp(log_logit_scale), 100): a parameter for text, a buffer (a fixed scale) otherwise."""

    def __init__(self, value: float, learnable: bool) -> None:
        super().__init__()
        log_scale = torch.tensor(value).log()
        if learnable:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_logit_scale.exp().clip(max=MAX_LOGIT_SCALE) * x


def token_head(width: int, embed_dim: int, dropout: bool = False) -> nn.Sequential:
    """LN -> class token -> (IMU: the dropout slot, identity in eval) -> Linear, indexed as the official heads."""
    layers = [nn.LayerNorm(width, eps=1e-6), SelectToken()] + ([nn.Identity()] if dropout else [])
    return nn.Sequential(*layers, nn.Linear(width, embed_dim, bias=False))


# ---- the model ----


class ImageBind(nn.Module):
    """The frozen ImageBind encoder (see the module docstring); `encode` is the encoder interface."""

    output = "global"

    def __init__(self, config: ImageBindConfig = ImageBindConfig()) -> None:
        super().__init__()
        self.config = config
        self.modalities = config.modalities
        self.embed_dim = config.embed_dim
        c, e = config, config.embed_dim
        self.modality_preprocessors = nn.ModuleDict({
            "vision": PatchPreprocessor("rgbt_stem", PatchStem(nn.Sequential(RepeatFrames(), nn.Conv3d(
                3, c.vision.width, (FRAMES, VISION_PATCH, VISION_PATCH), (FRAMES, VISION_PATCH, VISION_PATCH),
                bias=False)), None), (IMAGE_SIZE // VISION_PATCH) ** 2, c.vision.width, VISION_PATCH),
            "text": TextPreprocessor(c.vocab_size, c.context_length, c.text.width),
            "audio": PatchPreprocessor("rgbt_stem", PatchStem(nn.Conv2d(
                1, c.audio.width, AUDIO_KERNEL, AUDIO_STRIDE, bias=False), c.audio.width), audio_patches(),
                c.audio.width),
            **{m: PatchPreprocessor(STEM_NAMES[m], PatchStem(nn.Conv2d(
                1, getattr(c, m).width, DEPTH_PATCH, DEPTH_PATCH, bias=False), getattr(c, m).width),
                (IMAGE_SIZE // DEPTH_PATCH) ** 2, getattr(c, m).width, DEPTH_PATCH) for m in ("depth", "thermal")},
            "imu": ImuPreprocessor(c.imu.width),
        })
        self.modality_trunks = nn.ModuleDict(
            {m: Trunk(getattr(c, m), pre_norm=m == "vision", bias_kv=m in BIAS_KV) for m in MODALITIES}
        )
        heads: dict[str, nn.Module] = {m: token_head(getattr(c, m).width, e, dropout=m == "imu") for m in MODALITIES}
        heads["text"] = SelectEOSAndProject(c.text.width, e)
        posts: dict[str, nn.Module] = {m: nn.Sequential(Normalize(), LogitScale(v, False))
                                       for m, v in LOGIT_SCALES.items()}
        posts |= {"vision": nn.Sequential(Normalize()), "text": nn.Sequential(Normalize(), LogitScale(1 / 0.07, True))}
        if c.point is not None:
            self.point_trunk = PointTrunk(c.point)
            heads["point"] = nn.Sequential(nn.LayerNorm(c.point.out_dim, eps=1e-6), nn.Identity(),
                                           nn.Linear(c.point.out_dim, e, bias=False))
        else:
            self.point_trunk = None
            del posts["point"]
        self.modality_heads = nn.ModuleDict(heads)
        self.modality_postprocessors = nn.ModuleDict(posts)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> ImageBind:
        return super().train(False)  # frozen: always eval (see the module docstring)

    def head_output(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """One modality's batch -> its head output [B, embed_dim] (before normalisation and scaling)."""
        if modality == "point":
            return self.modality_heads["point"](self.point_trunk(x))
        tokens = self.modality_preprocessors[modality](x)
        mask = self.modality_preprocessors["text"].mask if modality == "text" else None
        tokens = self.modality_trunks[modality](tokens, mask)
        if modality == "text":
            return self.modality_heads["text"](tokens, x)
        return self.modality_heads[modality](tokens)

    @torch.no_grad()
    def encode(self, inputs: Mapping[str, torch.Tensor], prenorm: bool = False):
        """`{modality: batch}` -> `{modality: [B, embed_dim]}` normalised and scaled; with `prenorm`, also the
        head outputs before the postprocessor, `(post, pre)`. Clip lists (ndim >= 5) are averaged over clips."""
        post, pre = {}, {}
        for modality, x in inputs.items():
            if modality not in self.modalities:
                raise LitAdapterError(f"ImageBind takes {list(self.modalities)}, not {modality!r}"
                                      + (" (the point trunk comes with imagebind_w3D.pth)" if modality == "point"
                                         else ""))
            clips = x.shape[:2] if x.ndim >= 5 else None
            x = x.flatten(0, 1) if clips is not None else x
            if modality != "text":
                x = x.to(self.dtype)
            head = self.head_output(modality, x)
            out = self.modality_postprocessors[modality](head)
            if clips is not None:  # the mean of the clip embeddings, not renormalised (official)
                out, head = out.view(*clips, -1).mean(1), head.view(*clips, -1).mean(1)
            post[modality], pre[modality] = out, head
        return (post, pre) if prenorm else post

    @property
    def dtype(self) -> torch.dtype:
        return self.modality_heads["vision"][2].weight.dtype


def audio_patches() -> int:
    rows = (MEL_BINS - AUDIO_KERNEL) // AUDIO_STRIDE + 1
    return rows * ((AUDIO_FRAMES - AUDIO_KERNEL) // AUDIO_STRIDE + 1)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt (memory-mapped where possible) or .safetensors file."""
    if not path.is_file():
        raise LitAdapterError(f"{path}: ImageBind weights not found (set --encoder_weights / encoder_weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many types for unreadable files
        raise LitAdapterError(f"{path}: cannot read ImageBind weights ({first_line(err)})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise LitAdapterError(f"{path}: expected an ImageBind state dict, got {type(state).__name__}")
    return state


def load_imagebind(path: Union[str, Path, None], device: Union[str, torch.device, None] = None) -> ImageBind:
    """ImageBind from an official (or same-layout) weights file, loaded strictly; architecture from its shapes."""
    if path is None:
        raise LitAdapterError("ImageBind needs its weights: set encoder_weights (--encoder_weights PATH) to "
                              "imagebind_huge.pth or imagebind_w3D.pth")
    path = Path(path).expanduser()
    state = read_weights(path)
    config = ImageBindConfig.from_state_dict(state, str(path))
    with torch.device("meta"):
        model = ImageBind(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise LitAdapterError(f"{path}: does not fit ImageBind ({_first_problem(err)})") from None
    model.requires_grad_(False)
    return model.to(device or "cpu")


def _first_problem(err: RuntimeError) -> str:
    lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    return lines[0][:300] if lines else first_line(err)
