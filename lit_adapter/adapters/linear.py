"""LLaMA-Adapter V2 linear-layer tuning: bias/scale in its paper and official forms, plus LoRA, all foldable.

Every form is an instance of

    y = s_out * (W (s_in * x) + b0 + b) + scaling * L2 L1 x

paper: s_out and b; official_7b and bias: b only; official_65b: s_in and b. b0 is the base linear's own frozen bias
where the family has one (Qwen2's wq/wk/wv, Falcon with `bias: true`), absent on LLaMA: V2's trainable bias b is a
zero-initialised addition to it, never a replacement, so a fresh adapter leaves every output bit for bit as it was.
Folding gives y = W' x + b0' + b' with W' = diag(s_out) W diag(s_in) + scaling * L2 L1, b0' = s_out * b0 and
b' = s_out * b: `merge` writes W' and b0' into the base checkpoint and keeps b' in the adapter; `merge_linears`
puts b0' + b' into one plain linear.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional

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
    New parameters are float32 and are cast to the input's dtype when used. The base linear's own bias, if it has
    one, stays frozen as `base_bias` (the name `bias` is the adapter's, as in every adapter file).
    """

    FROZEN = ("weight", "base_bias")  # the base linear's own parameters

    def __init__(
        self,
        base: nn.Linear,
        bias: bool = False,
        scale: ScaleSide = None,
        lora_rank: int = 0,
        lora_alpha: Optional[float] = None,
    ) -> None:
        nn.Module.__init__(self)  # the weight is the base module's own Parameter: nothing new to allocate
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.base_bias = base.bias  # b0: the base's own frozen Parameter, or None
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
        # the base's own bias b0 goes where the base linear puts it (inside addmm), and the adapter's bias is added
        # after the product, so that a zero bias leaves y bit-identical to the base linear's
        y = F.linear(inputs, self.weight, self.base_bias)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.scale_side == "out":
            y = y * self.scale.to(y.dtype)
        if lora and self.lora_l1 is not None:
            delta = F.linear(F.linear(x, self.lora_l1.to(x.dtype)), self.lora_l2.to(x.dtype))
            y = y + (delta if self.lora_scaling == 1.0 else delta * self.lora_scaling)
        return y

    def folded(self, lora: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(W', b0' + b') with y = W' x + b0' + b' (None without any bias), in the weight's dtype."""
        return fold_linear(
            self.weight, bias=self.bias, scale=self.scale, scale_side=self.scale_side,
            lora_l1=self.lora_l1 if lora else None, lora_l2=self.lora_l2 if lora else None,
            lora_scaling=self.lora_scaling, base_bias=self.base_bias,
        )

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        parts.append(f"bias={self.bias is not None}")
        if self.base_bias is not None:
            parts.append("base_bias=True")
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
    base_bias: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """W' = diag(s_out) W diag(s_in) + scaling * L2 L1 and b0' + b' = s_out * (b0 + b), computed in float64.

    The returned weight has `weight`'s dtype, the bias that of `bias` (else `base_bias`); None without either.
    """
    w = weight.detach().double()
    if scale is not None and scale_side == "in":
        w = w * scale.detach().double()[None, :]
    elif scale is not None and scale_side == "out":
        w = scale.detach().double()[:, None] * w
    if lora_l1 is not None:
        w = w + lora_scaling * (lora_l2.detach().double() @ lora_l1.detach().double())
    biases = [b.detach().double() for b in (base_bias, bias) if b is not None]
    if not biases:
        return w.to(weight.dtype), None
    b = out_scaled(sum(biases), scale, scale_side)
    return w.to(weight.dtype), b.to((bias if bias is not None else base_bias).dtype)


def out_scaled(bias: torch.Tensor, scale: Optional[torch.Tensor], scale_side: ScaleSide) -> torch.Tensor:
    """s_out * bias in float64 (bias itself when the scale is on the input side, or absent)."""
    bias = bias.detach().double()
    return scale.detach().double() * bias if scale is not None and scale_side == "out" else bias


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
            if getattr(parent, name) is not None:  # (the GELU MLP has no w3)
                setattr(parent, name, AdaptedLinear(getattr(parent, name), **kwargs))


def adapted_linears(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def base_bias_keys(model: nn.Module, clean: Callable[[str], str] = str) -> dict[str, str]:
    """Parameter name -> its key in the base checkpoint, where the two differ: an AdaptedLinear holds the base's own
    bias as `base_bias`, the checkpoint as `bias` (which in the model is the adapter's). `clean` strips wrapper
    infixes from module names (FSDP)."""
    return {
        f"{clean(name)}.base_bias": f"{clean(name)}.bias"
        for name, module in model.named_modules()
        if isinstance(module, AdaptedLinear) and module.base_bias is not None
    }

