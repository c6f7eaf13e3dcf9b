"""Mixed dtypes in one model: a frozen base in bf16 (or float16) with float32 trainable parameters.

The policy, applied once: the model is built with float32 adapter parameters (`trainable_to_float32` catches the
trainable weights taken from the base, e.g. trained norms), and under "bf16-true" / "16-true" the precision plugin
`AdapterPrecision` casts the model as Lightning's `HalfPrecision` does, but leaves the trainable parameters float32,
so the optimizer state is float32 too. The adapter modules cast their float32 parameters to the activation dtype in
forward.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision import HalfPrecision
from torch import nn

from lit_adapter.errors import LitAdapterError

# the "-true" precisions that cast the whole model (and so would cast the trainable parameters too)
HALF_TRUE = ("bf16-true", "16-true")


def trainable_to_float32(module: nn.Module) -> None:
    """Trainable weights taken from the base (e.g. trained norms) come in the frozen dtype: make them float32."""
    for param in module.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def check_float32_trainables(module: nn.Module) -> None:
    """Fail with one line when a cast has reached the trainable parameters (e.g. Trainer(precision="bf16-true"))."""
    dtypes = sorted({str(p.dtype) for p in module.parameters() if p.requires_grad and p.dtype != torch.float32})
    if dtypes:
        raise LitAdapterError(f"trainable parameters in {dtypes}: pass plugins=[AdapterPrecision(...)] instead of a "
                              "'-true' precision (lit-adapter fit does), which keeps them float32")


class AdapterPrecision(HalfPrecision):
    """Lightning's "bf16-true" / "16-true" for adapter training: the frozen weights (and buffers) in the half dtype,
    the trainable parameters float32. Pass it as a plugin instead of `precision=` (`lit-adapter fit` does)."""

    def convert_module(self, module: nn.Module) -> nn.Module:
        # the trainable tensors are set aside and put back untouched: a cast to bf16 and back would round them
        keep = {p: p.data for p in module.parameters() if p.requires_grad and p.dtype == torch.float32}
        module.to(dtype=self._desired_input_dtype)
        for param, data in keep.items():
            param.data = data
        return module


def trainer_precision(precision: Any) -> dict[str, Any]:
    """Trainer arguments for `precision`: a half "-true" precision becomes the `AdapterPrecision` plugin (to be
    added to the trainer's plugins), any other stays `precision`."""
    if str(precision) in HALF_TRUE:
        return {"precision": None, "plugins": [AdapterPrecision(str(precision))]}
    return {"precision": precision, "plugins": []}
