"""LLaMA-Adapter V2 linear-layer tuning: bias/scale in its paper and official forms, plus LoRA, all foldable.

Every form is an instance of

    y = s_out * (W (s_in * x) + b) + scaling * L2 L1 x

paper: s_out and b; official_7b and bias: b only; official_65b: s_in and b. Folding gives y = W' x + b' with
W' = diag(s_out) W diag(s_in) + scaling * L2 L1 and b' = s_out * b.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.adapters.config import ATTENTION_LINEARS, LINEAR_NAMES, AdapterConfig
from lit_adapter.model import LLaMA

ScaleSide = Optional[Literal["in", "out"]]

BIAS_TARGETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "paper": LINEAR_NAMES,
    "official_7b": ("wq", "wo", "w1", "w2", "w3"),
    "official_65b": LINEAR_NAMES,
    "bias": LINEAR_NAMES,
}
SCALE_SIDES: dict[str, ScaleSide] = {"paper": "out", "official_65b": "in"}


class AdaptedLinear(nn.Linear):
    """A frozen nn.Linear with trainable bias, scale and/or LoRA; the base weight keeps its key (`...wq.weight`).

    Parameters: `bias` [out], `scale` [out] (paper) or [in] (official_65b), `lora_l1` [rank, in], `lora_l2` [out, rank].
    New parameters are float32 and are cast to the input's dtype when used.
    """

    def __init__(
        self,
        base: nn.Linear,
        bias: bool = False,
        scale: ScaleSide = None,
        lora_rank: int = 0,
        lora_alpha: Optional[float] = None,
    ) -> None:
        nn.Module.__init__(self)  # the weight is the base module's own Parameter: nothing new to allocate
        if base.bias is not None:
            raise ValueError("AdaptedLinear wraps LLaMA's bias-free linears")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        new = dict(device=base.weight.device, dtype=torch.float32)
        self.scale_side = scale
        self.lora_rank = lora_rank
        self.lora_scaling = lora_scaling(lora_alpha, lora_rank)
        scale_dim = self.in_features if scale == "in" else self.out_features
        shapes = {
            "bias": (self.out_features,) if bias else None,
            "scale": (scale_dim,) if scale else None,
            "lora_l1": (lora_rank, self.in_features) if lora_rank else None,
            "lora_l2": (self.out_features, lora_rank) if lora_rank else None,
        }
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **new)) if shape else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initial adapter values (bias 0, scale 1, LoRA l1 as nn.Linear, l2 0); the frozen weight is left alone."""
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.scale is not None:
            nn.init.ones_(self.scale)
        if self.lora_l1 is not None:
            nn.init.kaiming_uniform_(self.lora_l1, a=math.sqrt(5))
            nn.init.zeros_(self.lora_l2)

    def forward(self, x: torch.Tensor, lora: bool = True) -> torch.Tensor:
        inputs = x * self.scale.to(x.dtype) if self.scale_side == "in" else x
        # the bias is added after the product (not fused into addmm) so that a zero bias leaves y bit-identical
        y = F.linear(inputs, self.weight)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.scale_side == "out":
            y = y * self.scale.to(y.dtype)
        if lora and self.lora_l1 is not None:
            delta = F.linear(F.linear(x, self.lora_l1.to(x.dtype)), self.lora_l2.to(x.dtype))
            y = y + (delta if self.lora_scaling == 1.0 else delta * self.lora_scaling)
        return y

    def folded(self, lora: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(W', b') with y = W' x + b' (b' None without a bias), in the weight's dtype."""
        return fold_linear(
            self.weight, bias=self.bias, scale=self.scale, scale_side=self.scale_side,
            lora_l1=self.lora_l1 if lora else None, lora_l2=self.lora_l2 if lora else None,
            lora_scaling=self.lora_scaling,
        )

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        parts.append(f"bias={self.bias is not None}")
        if self.scale_side:
            parts.append(f"scale={self.scale_side}")
        if self.lora_rank:
            parts.append(f"lora_rank={self.lora_rank}")
        return ", ".join(parts)


@torch.no_grad()
def fold_linear(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    scale_side: ScaleSide = None,
    lora_l1: Optional[torch.Tensor] = None,
    lora_l2: Optional[torch.Tensor] = None,
    lora_scaling: float = 1.0,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """W' = diag(s_out) W diag(s_in) + scaling * L2 L1 and b' = s_out * b, computed in float64."""
    w = weight.detach().double()
    b = bias.detach().double() if bias is not None else None
    if scale is not None and scale_side == "in":
        w = w * scale.detach().double()[None, :]
    elif scale is not None and scale_side == "out":
        s = scale.detach().double()
        w = s[:, None] * w
        b = s * b if b is not None else None
    if lora_l1 is not None:
        w = w + lora_scaling * (lora_l2.detach().double() @ lora_l1.detach().double())
    return w.to(weight.dtype), (b.to(bias.dtype) if b is not None else None)


def lora_scaling(alpha: Optional[float], rank: int) -> float:
    """The LoRA factor `scaling` of the equation: alpha / rank, or 1 without alpha (the official code)."""
    return 1.0 if alpha is None or not rank else alpha / rank


def linear_parent(name: str) -> str:
    """The attribute of a LLaMA block holding linear `name`: "attention" (wq..wo) or "feed_forward" (w1..w3)."""
    return "attention" if name in ATTENTION_LINEARS else "feed_forward"


def linear_targets(config: AdapterConfig) -> dict[str, dict]:
    """For each linear name that gets adapted: the AdaptedLinear keyword arguments."""
    bias_targets = BIAS_TARGETS[config.bias_mode]
    lora_targets = config.lora_targets if config.lora_rank else []
    targets = {}
    for name in LINEAR_NAMES:
        has_bias, has_lora = name in bias_targets, name in lora_targets
        if has_bias or has_lora:
            targets[name] = dict(
                bias=has_bias,
                scale=SCALE_SIDES.get(config.bias_mode) if has_bias else None,
                lora_rank=config.lora_rank if has_lora else 0,
                lora_alpha=config.lora_alpha,
            )
    return targets


def parent_of(block: nn.Module, name: str) -> nn.Module:
    """The module holding linear `name` in a LLaMA block (see `linear_parent`)."""
    return getattr(block, linear_parent(name))


def attach_linears(llama: LLaMA, config: AdapterConfig) -> None:
    """Swap the targeted linears of every block for AdaptedLinear modules sharing the frozen weights."""
    targets = linear_targets(config)
    for block in llama.layers:
        for name, kwargs in targets.items():
            parent = parent_of(block, name)
            setattr(parent, name, AdaptedLinear(getattr(parent, name), **kwargs))


def adapted_linears(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}
