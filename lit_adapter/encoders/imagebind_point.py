"""The Point-BERT trunk of `imagebind_w3D.pth` (Point-Bind), keys under `point_trunk.` as in the official file.

A cloud [B, N, 3] -> 512 centres by farthest-point sampling -> the 32 nearest points of each, relative to their
centre -> a mini-PointNet per group (shared convs, max-pooled twice) -> `reduce_dim` to the trunk width, plus an
MLP of the centres as positions -> class token -> 12 pre-norm blocks, the positions re-added before each ->
LayerNorm -> [class token, max over the group tokens] -> `pc_projection` -> [B, 512].

Farthest-point sampling starts at point 0 of every cloud (the official CUDA kernel's choice), so a cloud always
gives the same embedding. The trunk is frozen and in eval mode: batch norms use their running statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lit_adapter.errors import LitAdapterError

HEAD_DIM = 64  # 384 wide / 6 heads in the official trunk
PREFIX = "point_trunk.point_encoder."


@dataclasses.dataclass(frozen=True)
class PointConfig:
    """Defaults: the official trunk (PointTransformer_8192point.yaml). Only the groups are not in the weights."""

    trans_dim: int = 384
    depth: int = 12
    heads: int = 6
    pointnet: tuple[int, int, int, int] = (128, 256, 512, 256)  # first_conv 3->a->b; second_conv 2b->c->d
    pos_hidden: int = 128
    out_dim: int = 512
    num_group: int = 512
    group_size: int = 32


def point_config(state: Mapping[str, torch.Tensor], source: str) -> PointConfig:
    """The point trunk's sizes, read from the shapes of its weights."""
    def shape(key: str) -> torch.Size:
        if key not in state:
            raise LitAdapterError(f"{source}: key {key!r} missing from the point trunk")
        return state[key].shape

    from lit_adapter.encoders.imagebind import count_blocks

    width = shape(PREFIX + "cls_token")[-1]
    convs = ("first_conv.0", "first_conv.3", "second_conv.0", "second_conv.3")
    pointnet = tuple(shape(f"{PREFIX}encoder.{conv}.weight")[0] for conv in convs)
    return PointConfig(width, count_blocks(state, PREFIX + "blocks.blocks."), width // HEAD_DIM, pointnet,
                       shape(PREFIX + "pos_embed.0.weight")[0], shape("point_trunk.pc_projection")[1])


def farthest_points(xyz: torch.Tensor, count: int) -> torch.Tensor:
    """Indices [B, count] of farthest-point sampling from index 0: each next point is the one farthest from all
    chosen so far (squared Euclidean distance)."""
    batch, n, _ = xyz.shape
    rows = torch.arange(batch, device=xyz.device)
    chosen = torch.zeros(batch, count, dtype=torch.long, device=xyz.device)
    nearest = torch.full((batch, n), float("inf"), dtype=xyz.dtype, device=xyz.device)
    farthest = torch.zeros(batch, dtype=torch.long, device=xyz.device)
    for i in range(count):
        chosen[:, i] = farthest
        nearest = torch.minimum(nearest, (xyz - xyz[rows, farthest][:, None]).square().sum(-1))
        farthest = nearest.argmax(-1)
    return chosen


def group(xyz: torch.Tensor, num_group: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(neighbourhoods [B, G, k, 3] relative to their centre, centres [B, G, 3])."""
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise LitAdapterError(f"point clouds must be [B, N, 3], got shape {list(xyz.shape)}")
    if xyz.shape[1] < num_group:
        raise LitAdapterError(f"a point cloud of {xyz.shape[1]} points is too small: the point trunk samples "
                              f"{num_group} centres (pass at least that many points)")
    rows = torch.arange(xyz.shape[0], device=xyz.device)[:, None]
    centres = xyz[rows, farthest_points(xyz, num_group)]
    distances = torch.cdist(centres, xyz).square()  # [B, G, N]
    nearest = distances.topk(group_size, dim=-1, largest=False).indices  # order is irrelevant: max-pooled below
    return xyz[rows[..., None], nearest] - centres[:, :, None], centres


class MiniPointNet(nn.Module):
    """Per group: conv-BN-ReLU-conv, max over points, concat [global, per point], conv-BN-ReLU-conv, max."""

    def __init__(self, widths: tuple[int, int, int, int]) -> None:
        super().__init__()
        a, b, c, d = widths
        self.first_conv = nn.Sequential(nn.Conv1d(3, a, 1), nn.BatchNorm1d(a), nn.ReLU(), nn.Conv1d(a, b, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(2 * b, c, 1), nn.BatchNorm1d(c), nn.ReLU(), nn.Conv1d(c, d, 1))

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        batch, count, size, _ = groups.shape
        x = self.first_conv(groups.reshape(batch * count, size, 3).transpose(1, 2))  # [BG, b, k]
        pooled = x.max(dim=2, keepdim=True).values
        x = self.second_conv(torch.cat([pooled.expand(-1, -1, size), x], dim=1))
        return x.max(dim=2).values.view(batch, count, -1)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn, self.mlp = Attention(width, heads), Mlp(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Blocks(nn.Module):
    def __init__(self, width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)  # the positions are added again before every block
        return x


class PointEncoder(nn.Module):
    def __init__(self, config: PointConfig) -> None:
        super().__init__()
        width = config.trans_dim
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, width))
        self.encoder = MiniPointNet(config.pointnet)
        self.reduce_dim = nn.Linear(config.pointnet[3], width)
        self.pos_embed = nn.Sequential(nn.Linear(3, config.pos_hidden), nn.GELU(), nn.Linear(config.pos_hidden, width))
        self.blocks = Blocks(width, config.depth, config.heads)
        self.norm = nn.LayerNorm(width)

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        """[B, N, 3] -> [B, 2 * trans_dim]: the class token and the max over the group tokens."""
        groups, centres = group(xyz, self.config.num_group, self.config.group_size)
        tokens = self.reduce_dim(self.encoder(groups))
        batch = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(batch, -1, -1), self.pos_embed(centres)], dim=1)
        x = self.norm(self.blocks(x, pos))
        return torch.cat([x[:, 0], x[:, 1:].max(dim=1).values], dim=-1)


class PointTrunk(nn.Module):
    """`point_encoder` then the right-multiplied `pc_projection` [2 * trans_dim, out_dim]."""

    def __init__(self, config: PointConfig) -> None:
        super().__init__()
        self.point_encoder = PointEncoder(config)
        self.pc_projection = nn.Parameter(torch.zeros(2 * config.trans_dim, config.out_dim))

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        return self.point_encoder(xyz) @ self.pc_projection
