"""The official ImageBind state-dict layout (key -> shape), written from the documented key list, not from our
module: scaled-down widths for tests, the huge sizes for the key/parameter counts."""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np
import torch

E = 1024  # the joint embedding width (kept at tiny sizes: the bind network expects 1024)
HUGE = {"vision": (1280, 32), "text": (1024, 24), "audio": (768, 12), "depth": (384, 12), "thermal": (768, 12),
        "imu": (512, 6)}
# tiny widths keep the official head widths (vision 80, depth 48, others 64): one head each
TINY = {"vision": (80, 1), "text": (64, 1), "audio": (64, 1), "depth": (48, 1), "thermal": (64, 1), "imu": (64, 1)}
HUGE_POINT = {"width": 384, "depth": 12, "pointnet": (128, 256, 512, 256), "pos_hidden": 128, "out": 512}
TINY_POINT = {"width": 64, "depth": 1, "pointnet": (8, 16, 32, 16), "pos_hidden": 16, "out": 32}
SCALES = {"text": 1 / 0.07, "audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0, "point": 1.0}
BIAS_KV = ("audio", "depth", "thermal", "imu")


def ln(prefix: str, width: int) -> dict[str, tuple]:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def imagebind_shapes(sizes: dict = TINY, point: dict | None = TINY_POINT) -> dict[str, tuple]:
    """key -> shape of an ImageBind (w3D when `point`) state dict."""
    s: dict[str, tuple] = {}
    v, t, a, d, th, i = (sizes[m][0] for m in ("vision", "text", "audio", "depth", "thermal", "imu"))
    p = "modality_preprocessors."
    s |= {p + "vision.cls_token": (1, 1, v), p + "vision.rgbt_stem.proj.1.weight": (v, 3, 2, 14, 14),
          p + "vision.pos_embedding_helper.pos_embed": (1, 257, v)}
    s |= {p + "text.pos_embed": (1, 77, t), p + "text.mask": (77, 77), p + "text.token_embedding.weight": (49408, t)}
    s |= {p + "audio.cls_token": (1, 1, a), p + "audio.rgbt_stem.proj.weight": (a, 1, 16, 16),
          **ln(p + "audio.rgbt_stem.norm_layer", a), p + "audio.pos_embedding_helper.pos_embed": (1, 229, a)}
    s |= {p + "depth.cls_token": (1, 1, d), p + "depth.depth_stem.proj.weight": (d, 1, 16, 16),
          **ln(p + "depth.depth_stem.norm_layer", d), p + "depth.pos_embedding_helper.pos_embed": (1, 197, d)}
    s |= {p + "thermal.cls_token": (1, 1, th), p + "thermal.rgbt_stem.proj.weight": (th, 1, 16, 16),
          **ln(p + "thermal.rgbt_stem.norm_layer", th), p + "thermal.pos_embedding_helper.pos_embed": (1, 197, th)}
    s |= {p + "imu.pos_embed": (1, 251, i), p + "imu.cls_token": (1, 1, i), p + "imu.imu_stem.proj.weight": (i, 48),
          **ln(p + "imu.imu_stem.norm_layer", i)}
    s |= ln("modality_trunks.vision.pre_transformer_layer.0", v)
    for m, (width, depth) in sizes.items():
        for b in range(depth):
            q = f"modality_trunks.{m}.blocks.{b}."
            s |= {q + "attn.in_proj_weight": (3 * width, width), q + "attn.in_proj_bias": (3 * width,),
                  q + "attn.out_proj.weight": (width, width), q + "attn.out_proj.bias": (width,),
                  **ln(q + "norm_1", width), q + "mlp.fc1.weight": (4 * width, width), q + "mlp.fc1.bias": (4 * width,),
                  q + "mlp.fc2.weight": (width, 4 * width), q + "mlp.fc2.bias": (width,), **ln(q + "norm_2", width)}
            if m in BIAS_KV:
                s |= {q + "attn.bias_k": (1, 1, width), q + "attn.bias_v": (1, 1, width)}
    h = "modality_heads."
    s |= {**ln(h + "vision.0", v), h + "vision.2.weight": (E, v)}
    s |= {**ln(h + "text.proj.0", t), h + "text.proj.1.weight": (E, t)}
    for m, width in (("audio", a), ("depth", d), ("thermal", th)):
        s |= {**ln(h + f"{m}.0", width), h + f"{m}.2.weight": (E, width)}
    s |= {**ln(h + "imu.0", i), h + "imu.3.weight": (E, i)}
    s |= {f"modality_postprocessors.{m}.1.log_logit_scale": () for m in ("text", "audio", "depth", "thermal", "imu")}
    if point is not None:
        s |= point_shapes(point)
    return s


def point_shapes(c: dict) -> dict[str, tuple]:
    w, (c1, c2, c3, c4), ph, out = c["width"], c["pointnet"], c["pos_hidden"], c["out"]
    pe = "point_trunk.point_encoder."

    def bn(prefix: str, n: int) -> dict[str, tuple]:
        return {**ln(prefix, n), f"{prefix}.running_mean": (n,), f"{prefix}.running_var": (n,),
                f"{prefix}.num_batches_tracked": ()}

    s = {"point_trunk.pc_projection": (2 * w, out), pe + "cls_token": (1, 1, w), pe + "cls_pos": (1, 1, w),
         pe + "encoder.first_conv.0.weight": (c1, 3, 1), pe + "encoder.first_conv.0.bias": (c1,),
         **bn(pe + "encoder.first_conv.1", c1), pe + "encoder.first_conv.3.weight": (c2, c1, 1),
         pe + "encoder.first_conv.3.bias": (c2,), pe + "encoder.second_conv.0.weight": (c3, 2 * c2, 1),
         pe + "encoder.second_conv.0.bias": (c3,), **bn(pe + "encoder.second_conv.1", c3),
         pe + "encoder.second_conv.3.weight": (c4, c3, 1), pe + "encoder.second_conv.3.bias": (c4,),
         pe + "reduce_dim.weight": (w, c4), pe + "reduce_dim.bias": (w,), pe + "pos_embed.0.weight": (ph, 3),
         pe + "pos_embed.0.bias": (ph,), pe + "pos_embed.2.weight": (w, ph), pe + "pos_embed.2.bias": (w,),
         **ln(pe + "norm", w)}
    for b in range(c["depth"]):
        q = f"{pe}blocks.blocks.{b}."
        s |= {**ln(q + "norm1", w), **ln(q + "norm2", w), q + "mlp.fc1.weight": (4 * w, w),
              q + "mlp.fc1.bias": (4 * w,), q + "mlp.fc2.weight": (w, 4 * w), q + "mlp.fc2.bias": (w,),
              q + "attn.qkv.weight": (3 * w, w), q + "attn.proj.weight": (w, w), q + "attn.proj.bias": (w,)}
    s |= {**ln("modality_heads.point.0", out), "modality_heads.point.2.weight": (E, out),
          "modality_postprocessors.point.1.log_logit_scale": ()}
    return s


def imagebind_state(sizes: dict = TINY, point: dict | None = TINY_POINT, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in that layout: norms near 1, the documented buffers (causal mask, log scales) exact."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in imagebind_shapes(sizes, point).items():
        if key.endswith("log_logit_scale"):
            state[key] = torch.tensor(math.log(SCALES[key.split(".")[1]]))
        elif key.endswith("text.mask"):
            state[key] = torch.full(shape, float("-inf")).triu(1)
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith(("norm_1.weight", "norm_2.weight", "norm1.weight", "norm2.weight", ".0.weight", "norm.weight",
                           "norm_layer.weight", "first_conv.1.weight", "second_conv.1.weight")) and len(shape) == 1:
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = 0.05 * torch.randn(shape, generator=g)
    return state


def save_tiny_imagebind(path, seed: int = 0, point: bool = True):
    torch.save(imagebind_state(point=TINY_POINT if point else None, seed=seed), path)
    return path


def write_pcm16(path: Path, samples: np.ndarray, rate: int) -> Path:
    """A mono 16-bit PCM WAV of `samples` (int16), written with the standard library."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.astype(np.int16).tobytes())
    return path
