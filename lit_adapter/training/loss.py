"""The training objective: next-token cross-entropy over the supervised tokens only.

`head_cross_entropy` is what training uses: it takes the model's final hidden states (`hidden_only=True`) and applies
the classifier to the supervised positions alone, in chunks, so the [B, T, vocab] logits (the largest activation of
an adapter step: 125 MB in float32 for 4 x 256 tokens of a 32K vocabulary) and their log-softmax never exist. The
classifier is frozen, so d loss / d hidden is all backward needs, and it is computed chunk by chunk in the forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.data.batch import IGNORE_INDEX

CHUNK_LOGITS = 2**23  # logits per chunk: 32 MiB in float32 (262 rows of a 32K vocabulary); larger chunks gain nothing
LossSum = tuple[torch.Tensor, torch.Tensor]


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> LossSum:
    """(sum of token losses, number of supervised tokens): logits at t predict labels at t+1; IGNORE_INDEX labels
    are not supervised."""
    logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()


def head_cross_entropy(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk: Optional[int] = None
) -> LossSum:
    """masked_cross_entropy(head(hidden), labels) from hidden states [B, T, dim], computing logits only where a
    label is supervised, `chunk` rows at a time. A trainable head falls back to plain autograd over those positions."""
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    rows, targets = hidden[:, :-1][supervised], targets[supervised]
    count = supervised.sum()
    if head.weight.requires_grad or head.bias is not None:
        logits = head(rows)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, targets, reduction="sum"), count
    need_grad = torch.is_grad_enabled() and rows.requires_grad
    chunk = chunk or max(16, CHUNK_LOGITS // head.out_features)
    return FrozenHeadCrossEntropy.apply(rows, head.weight, targets, chunk, need_grad), count


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ weight.T, targets) for a frozen weight [vocab, dim].

    Chunk by chunk, the forward computes the loss and, when `need_grad`, d loss / d hidden = (softmax - onehot) @
    weight, which it keeps for backward instead of any logits. Logits are float32 (bf16 hidden states included).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                need_grad: bool) -> torch.Tensor:
        loss_dtype = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=loss_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            rows = torch.arange(t.shape[0], device=t.device)
            logits = (h @ weight.t()).to(loss_dtype)  # (chunk, vocab): the one large buffer, reused in place below
            target_logits = logits[rows, t]
            top = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(top).exp_()  # exp(logits - max)
            sums = exps.sum(dim=-1, keepdim=True)
            total += (sums.log() + top).squeeze(1).sub_(target_logits).sum()  # logsumexp(logits) - target logit
            if grad_hidden is not None:
                probs = exps.div_(sums)  # softmax
                probs[rows, t] -= 1.0  # softmax - onehot = d loss / d logits
                grad_hidden[start:start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None, None
