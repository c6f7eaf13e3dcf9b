"""The visual path: a frozen open_clip image tower and the trainable adapter that turns its features into LLaMA tokens.

Mode "tokens" (LLaMA-Adapter V2, official 7B multimodal): all CLIP tokens after `ln_post` and the visual projection
(ViT-L/14: 257 x 768) -> `clip_proj` + `clip_proj_norm` -> `visual_query` prepended -> `visual_blocks` (`ViTBlock`s)
-> the first `visual_len` tokens -> `visual_proj` + `visual_proj_norm` -> [B, visual_len, llama_dim].

Mode "global" (LLaMA-Adapter V1 multimodal, ScienceQA): the CLIP global image embedding -> `visual_proj`, a two-layer
MLP (Linear -> GELU -> Linear; the paper names only "a learnable projection network") -> `visual_proj_norm`
-> [B, 1, llama_dim].

Mode "bind" (ImageBind-LLM): the frozen ImageBind encoder's global embedding of each input (image, video, audio,
depth, thermal, IMU, points), normalised and mixed by weight (`encoders.joint`; optionally blended with the cache
`cache`) -> `bind`: a projection and three gated RMSNorm SwiGLU residual blocks -> [B, 1, llama_dim].

The frozen encoders (names, weights, transforms) are in `lit_adapter.encoders` (open_clip: `clip.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from lit_adapter.adapters.clip import (  # noqa: F401  (TINY_CLIP_MODEL, load_open_clip: re-exported)
    TINY_CLIP_MODEL,
    ClipEncoder,
    build_clip_encoder,
    clip_embed_dim,
    clip_image_size,
    clip_model_config,
    image_transform,
    load_open_clip,
)
from lit_adapter.config import DictConfig
from lit_adapter.errors import LitAdapterError
from lit_adapter.model import RMSNorm

_MODES = ("tokens", "global", "bind")
ENCODERS = ("open_clip", "imagebind")
IMAGEBIND_DIM = 1024  # the joint embedding width of ImageBind (and of the scaled-down test encoders)


def __getattr__(name: str) -> Any:
    """`visual.open_clip` stays available as a module attribute (imported and set up on first access)."""
    if name == "open_clip":
        return load_open_clip()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class VisualConfig(DictConfig):
    """The visual path: which frozen open_clip tower, and the shape of the trainable adapter above it.

    `clip_pretrained`: an open_clip tag ("openai", downloaded by open_clip), a local weights file (an open_clip or
    OpenAI state dict, full or image tower only, .pt/.pth/.bin/.safetensors, or OpenAI's TorchScript release), or None
    for random init (OpenAI weights saved as a plain state dict need clip_model "ViT-L-14-quickgelu").
    `width`: the adapter's hidden width (None = the CLIP embedding width). `image_size`: None = the model's own size;
    another size interpolates the position embeddings.
    `encoder`: "open_clip" (modes tokens, global) or "imagebind" (mode bind, weights from `encoder_weights`: an
    official `imagebind_huge.pth` / `imagebind_w3D.pth` or a file in that layout; None = attach one later). Under
    mode bind, `n_blocks` counts the bind network's blocks (official: 3) and `width` is their SwiGLU hidden width
    (None = 4 x the LLaMA width).
    `channel_order`: "rgb", or "bgr" for weights trained on images read with OpenCV and handed to PIL unchanged, as
    the official V2 code does (its files default to it; see `lit_adapter.adapters.clip`).
    """

    config_name: ClassVar[str] = "visual config"

    clip_model: str = "ViT-L-14"
    clip_pretrained: Optional[str] = "openai"
    mode: str = "tokens"
    visual_len: int = 10
    n_blocks: int = 8
    block_heads: int = 16
    mlp_ratio: float = 4.0
    width: Optional[int] = None
    image_size: Optional[int] = None
    encoder: str = "open_clip"
    encoder_weights: Optional[str] = None
    channel_order: str = "rgb"

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise LitAdapterError(f"visual config: encoder {self.encoder!r} is not one of {list(ENCODERS)}")
        if self.mode not in _MODES:
            raise LitAdapterError(f"visual config: mode {self.mode!r} is not one of {list(_MODES)}")
        if (self.mode == "bind") != (self.encoder == "imagebind"):
            raise LitAdapterError(f"visual config: mode {self.mode!r} does not go with encoder {self.encoder!r} "
                                  "(mode bind is ImageBind's, tokens and global open_clip's)")
        if self.encoder == "open_clip":
            clip_model_config(self.clip_model)
        if self.channel_order not in ("rgb", "bgr"):
            raise LitAdapterError(f"visual config: channel_order {self.channel_order!r} is not one of ['rgb', 'bgr']")
        for name in ("visual_len", "n_blocks", "block_heads"):
            if getattr(self, name) < 1:
                raise LitAdapterError(f"visual config: {name} must be >= 1, got {getattr(self, name)}")
        if self.mlp_ratio <= 0:
            raise LitAdapterError(f"visual config: mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.width is not None and self.width < 1:
            raise LitAdapterError(f"visual config: width must be >= 1 or None, got {self.width}")
        if self.image_size is not None and self.image_size < 1:
            raise LitAdapterError(f"visual config: image_size must be >= 1 or None, got {self.image_size}")
        if self.mode == "tokens" and self.resolved_width % self.block_heads:
            raise LitAdapterError(
                f"visual config: width {self.resolved_width} is not a multiple of block_heads {self.block_heads}"
            )

    @property
    def embed_dim(self) -> int:
        return IMAGEBIND_DIM if self.encoder == "imagebind" else clip_embed_dim(self.clip_model)

    @property
    def resolved_width(self) -> int:
        return self.width or self.embed_dim

    @property
    def resolved_image_size(self) -> int:
        if self.encoder == "imagebind":
            return 224
        return self.image_size or clip_image_size(self.clip_model)

    @property
    def num_tokens(self) -> int:
        """How many LLaMA-width tokens the adapter makes per image."""
        return self.visual_len if self.mode == "tokens" else 1

    def transform(self, train: bool) -> Callable:
        if self.encoder == "imagebind":
            from lit_adapter.media.vision import image_transform as imagebind_transform

            return imagebind_transform(train)
        return image_transform(self.clip_model, train, self.image_size, self.clip_pretrained, self.channel_order)


class ViTBlock(nn.Module):
    """The ViT block of the official visual adapter (timm's `Block` with a qkv bias and torch's LayerNorm; no layer
    scale, drop path or q/k norm), under timm's parameter names so that official files load as they are:
    x += proj(attention(qkv(norm1(x)))); x += fc2(gelu(fc1(norm2(x)))). Written here because importing timm (and
    torchvision through it) costs seconds at every start of a command that loads such an adapter."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(batch, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, length, head_dim]
        attended = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, dim)
        x = x + self.attn.proj(attended)
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class BindBlock(nn.Module):
    """x + f2(silu(f1(n(x))) * f3(n(x))), n an RMSNorm (eps 1e-6), the linears bias-free."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps=1e-6)
        self.f1, self.f3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.f2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.f2(nn.functional.silu(self.f1(h)) * self.f3(h))


class BindNetwork(nn.Module):
    """ImageBind-LLM's bind network: `proj` (Linear with bias) then the residual `blocks`."""

    def __init__(self, embed_dim: int, dim: int, hidden: int, n_blocks: int) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_dim, dim)
        self.blocks = nn.ModuleList(BindBlock(dim, hidden) for _ in range(n_blocks))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        x = self.proj(f)
        for block in self.blocks:
            x = block(x)
        return x



class VisualAdapter(nn.Module):
    """Images -> visual tokens for LLaMA: the frozen `clip` tower plus the trainable projection (see the module doc).

    `load_clip=False` builds only the trainable part (`clip` is None): for counting parameters, meta-device
    construction (`to_empty` + `reset_parameters`, then `attach_encoder(build_clip_encoder(config))`), or when the
    features are precomputed (`project`).
    """

    def __init__(
        self, config: VisualConfig, llama_dim: int, load_clip: bool = True, encoder: Optional[ClipEncoder] = None
    ) -> None:
        super().__init__()
        self.config = config
        self.llama_dim = llama_dim
        self.register_module("clip", None)
        self.cache = None  # bind mode: an encoders.joint.EmbeddingCache and its CacheSettings, set for inference
        embed, width = config.embed_dim, config.resolved_width
        if config.mode == "bind":
            self.bind = BindNetwork(embed, llama_dim, config.width or 4 * llama_dim, config.n_blocks)
        elif config.mode == "tokens":
            self.clip_proj = nn.Linear(embed, width)
            self.clip_proj_norm = nn.LayerNorm(width)
            self.visual_query = nn.Embedding(config.visual_len, width)
            # the official code's timm 0.3.2 Block used torch's LayerNorm (eps 1e-5; newer timm defaults to 1e-6)
            self.visual_blocks = nn.ModuleList(
                ViTBlock(width, config.block_heads, config.mlp_ratio) for _ in range(config.n_blocks)
            )
            self.visual_proj = nn.Linear(width, llama_dim)
        else:
            self.visual_proj = nn.Sequential(nn.Linear(embed, width), nn.GELU(), nn.Linear(width, llama_dim))
        if config.mode != "bind":
            self.visual_proj_norm = nn.LayerNorm(llama_dim)
        if encoder is not None:
            self.attach_encoder(encoder)
        elif load_clip and (config.encoder == "open_clip" or config.encoder_weights is not None):
            from lit_adapter.encoders import build_encoder

            self.attach_encoder(build_encoder(config))

    def attach_encoder(self, encoder: nn.Module) -> None:
        """The frozen encoder (kept as `clip` whichever it is); its embedding width must be the adapter's."""
        if encoder.embed_dim != self.config.embed_dim:
            name = getattr(encoder, "clip_model", type(encoder).__name__)
            raise LitAdapterError(
                f"encoder {name!r} makes {encoder.embed_dim}-wide features, the visual adapter expects "
                f"{self.config.embed_dim} ({self.config.encoder}): the adapter and the encoder weights do not match"
            )
        if self.config.mode == "global" and hasattr(encoder, "tokens"):
            encoder.tokens = False
        self.clip = encoder

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Everything but the frozen CLIP tower."""
        for name, param in self.named_parameters():
            if not name.startswith("clip."):
                yield name, param

    def reset_parameters(self) -> None:
        """Default init of the trainable part (the CLIP tower is loaded, not initialised); works after to_empty()."""
        for name, child in self.named_children():
            if name == "clip":
                continue
            for module in child.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()

    def forward(self, images: Union[torch.Tensor, Sequence[tuple[str, torch.Tensor, float]]]) -> torch.Tensor:
        """[B, 3, S, S] normalised images -> [B, visual_len (tokens) or 1 (global, bind), llama_dim]. Mode bind also
        takes weighted inputs of any modality: [(modality, batch, weight), ...], mixed as ImageBind-LLM does."""
        if self.clip is None:
            if self.config.encoder == "imagebind":
                raise LitAdapterError("the visual adapter has no ImageBind encoder; set encoder_weights "
                                      "(--encoder_weights PATH) to imagebind_w3D.pth")
            raise LitAdapterError("the visual adapter has no CLIP encoder; attach one with build_clip_encoder(config)")
        if self.config.mode == "bind":
            return self.bind(self.joint_embedding(images)).unsqueeze(1)
        return self.project(self.clip(images, all_tokens=self.config.mode == "tokens"))

    def joint_embedding(self, inputs: Union[torch.Tensor, Sequence[tuple[str, torch.Tensor, float]]]) -> torch.Tensor:
        """The normalised, weight-mixed ImageBind embedding [B, embed] (blended with the cache when one is set)."""
        from lit_adapter.encoders import joint

        if isinstance(inputs, torch.Tensor):
            inputs = [("vision", inputs, 1.0)]
        embeddings = [self.clip.encode({modality: x})[modality] for modality, x, _ in inputs]
        f = joint.mix(embeddings, [weight for _, _, weight in inputs]).to(self.bind.proj.weight.dtype)
        if self.cache is not None:
            f = joint.blend(f, *self.cache)
        return f

    def project(self, clip_features: torch.Tensor) -> torch.Tensor:
        """CLIP features ([B, N, embed] tokens or [B, embed] global) -> [B, num_tokens, llama_dim]."""
        features = clip_features.to(self.visual_proj_norm.weight.dtype)
        if self.config.mode == "global":
            return self.visual_proj_norm(self.visual_proj(features)).unsqueeze(1)
        x = self.clip_proj_norm(self.clip_proj(features))
        queries = self.visual_query.weight.unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([queries, x], dim=1)
        for block in self.visual_blocks:
            x = block(x)
        return self.visual_proj_norm(self.visual_proj(x[:, : self.config.visual_len]))
