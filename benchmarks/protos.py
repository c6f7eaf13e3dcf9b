"""Prototype optimisations of our model and training loss, applied inside a benchmark process only (`--proto`).

Each prototype is a candidate change to lit_adapter itself, measured here before it is made there:

- head_ce: the training loss without full logits. The model stops at its final norm; the classifier and the
  cross-entropy run only on supervised positions, in chunks, and the gradient with respect to the hidden states is
  computed during the forward pass (the classifier is frozen, so it is all backward needs). Full [B, T, vocab]
  logits, their shifted copy, log-softmax and gradient are never materialised.
- complex_rope: RoPE as one complex multiplication (Meta's formulation) instead of select/stack on even/odd pairs.
- compile: torch.compile every block (the prototype's own compile time is excluded by the warm-up steps).
- swiglu: the SwiGLU product as one autograd function that keeps only w1 x and w3 x for backward (silu is
  recomputed), instead of three [tokens, hidden] tensors.
- lazy_visual: the memory and start-up time of lit_adapter.adapters if adapters/visual.py imported open_clip and
  timm (with torchvision) only when a visual adapter is built. Emulated by placeholder modules: the text-only models
  benchmarked here never touch them.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100
PROTOS = {
    "head_ce": "classifier + cross-entropy on supervised positions only, chunked, no full logits",
    "complex_rope": "RoPE as a complex multiplication",
    "compile": "torch.compile every block",
    "swiglu": "SwiGLU as one autograd function saving two tensors instead of three",
    "lazy_visual": "open_clip / timm imported only when a visual adapter is built (emulated)",
}
VISUAL_MODULES = ("open_clip", "open_clip.model", "open_clip.transform", "open_clip.transformer", "open_clip.factory",
                  "timm", "timm.models", "timm.models.vision_transformer")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over supervised positions (the training module's formula), computed in float32."""
    logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def patch_model_code(names: list[str]) -> None:
    """Swap functions of lit_adapter.model for the prototypes named (before the model is built)."""
    if "lazy_visual" in names:
        install_visual_placeholders()
    import lit_adapter.model as model_module

    if "complex_rope" in names:
        model_module.apply_rope = complex_rope
    if "swiglu" in names:
        model_module.FeedForward.forward = swiglu_forward


class _Placeholder(types.ModuleType):
    """A module whose every attribute is a placeholder: enough for `from X import Y` and class bodies."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "list_models":
            from lit_adapter.adapters.visual import TINY_CLIP_MODEL

            return lambda: [TINY_CLIP_MODEL]  # makes visual.py's import-time registration a no-op
        return type(name, (), {})


def install_visual_placeholders() -> None:
    """Stand-ins for open_clip and timm, unless lit_adapter.adapters is already imported (then it is too late)."""
    if "lit_adapter.adapters.visual" in sys.modules:
        return
    for name in VISUAL_MODULES:
        sys.modules.setdefault(name, _Placeholder(name))


def complex_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope as one complex product: (x[2i] + i x[2i+1]) * (cos + i sin)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    rotation = torch.complex(cos, sin).unsqueeze(-2)
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def swiglu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.w2(SwiGLU.apply(self.w1(x), self.w3(x)))


class SwiGLU(torch.autograd.Function):
    """silu(a) * b, saving a and b only."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        sig = torch.sigmoid(a)
        grad_a = grad * b * sig * (1 + a * (1 - sig))  # d silu(a) / da = sig * (1 + a (1 - sig))
        return grad_a, grad * (a * sig)


def ours_loss(model: Any, names: list[str]) -> LossFn:
    """loss(input_ids, labels) for an AdapterModel, with the prototypes named (patch_model_code first)."""
    if "compile" in names:
        for block in model.llama.layers:
            block.compile()
    if "head_ce" not in names:
        return lambda input_ids, labels: masked_cross_entropy(model(input_ids), labels)
    llama = model.llama
    head = llama.output
    llama.output = nn.Identity()  # the model now returns its final normed hidden states

    def loss(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return head_cross_entropy(model(input_ids), head.weight, labels)

    return loss


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 128):
    """masked_cross_entropy(hidden @ weight.T, labels) for a frozen `weight`, without materialising the logits."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return FrozenHeadCrossEntropy.apply(hidden[:, :-1][keep], weight, targets[keep], chunk)


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (hidden @ weight.T) against targets; weight gets no gradient.

    The forward pass computes, chunk by chunk, the loss and d loss / d hidden = (softmax - onehot) @ weight / N, and
    keeps only the latter ([N, dim]) for backward.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        count = max(hidden.shape[0], 1)
        loss_dtype = torch.promote_types(hidden.dtype, torch.float32)  # bf16 logits are upcast, float64 kept
        total = torch.zeros((), dtype=loss_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            rows = torch.arange(t.shape[0], device=t.device)
            logits = (h @ weight.t()).to(loss_dtype)  # the only [chunk, vocab] buffer: everything below is in place
            target_logits = logits[rows, t]
            top = logits.amax(dim=-1, keepdim=True)
            sums = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)
            total += (sums.log() + top).squeeze(1).sub_(target_logits).sum()
            probs = logits.div_(sums)  # softmax; minus the one-hot target gives d loss / d logits
            probs[rows, t] -= 1.0
            grad_hidden[start:start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        ctx.count = count
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * (grad_output / ctx.count).to(grad_hidden.dtype), None, None, None
