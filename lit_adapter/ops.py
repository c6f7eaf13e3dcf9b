"""The fast kernels the model calls, each checked equal to its plain formula (tests/test_ops.py).

- `attention`: softmax(q k^T / sqrt(d) + mask) v for the token attention, by one of two paths that compute the same
  thing: torch's `scaled_dot_product_attention` (SDPA) or `grouped_attention`, written out with the query heads that
  share a key head stacked along the query axis. Which one runs is chosen by capability where that settles it, else
  by a probe that times both once on the running machine (`AttentionPaths`).
- `grouped_attention` is also the gated prompt attention's kernel (`adapters/prompt.py`): its per-head `weight`
  scales the probabilities, so a gate's gradient needs only the [T, K] probabilities.
- `silu_mul`: SwiGLU's silu(a) * b, saving a and b only for backward (`SiluMul`).

The training loss over a frozen classifier lives with training (`lit_adapter.training.loss.head_cross_entropy`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Hashable, Iterator, Literal, Optional, TypeVar

import torch
import torch.nn.functional as F

AttentionPath = Literal["sdpa", "grouped"]
K = TypeVar("K", bound=Hashable)

PROBE_BUDGET_SECONDS = 0.002  # an attention call slower than this (a long prefill) is timed once per round
# a probed path or setting replaces the default only when faster by more than this fraction in every round: two
# near-equal candidates timed in isolation rank by noise, and the default is the one that holds up under load
TOLERANCE = 0.05


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v through torch's SDPA; causal when `mask` is None.

    Args:
        q: [B, heads, T, head_dim]; k, v: [B, kv_heads, S, head_dim] (heads a multiple of kv_heads).
        mask: boolean [B or 1, 1, T, S], True = attend.
    Returns:
        [B, heads, T, head_dim].
    """
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """weight * softmax(q k^T / sqrt(d)) v written out, scores in float32 at least; no mask means none (not causal).

    The query heads sharing a key head are stacked along the query axis, so keys and values are never repeated per
    query head and a slice of the KV cache is multiplied where it lies.

    Args:
        q: [B, heads, T, head_dim]; k, v: [B or 1, kv_heads, S, head_dim].
        mask: boolean [B, 1, T, S], True = attend.
        weight: [B or 1, heads, 1, 1], scales each head's probabilities (a gate).
    Returns:
        [B, heads, T, head_dim].
    """
    batch, heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    stacked = q.reshape(batch, kv_heads, groups * length, head_dim)  # (B, kv_heads, groups * T, hs)
    scores = stacked @ k.transpose(-1, -2)  # (B, kv_heads, groups * T, S)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * head_dim**-0.5
    scores = scores.unflatten(2, (groups, length))  # (B, kv_heads, groups, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))  # mask (B, 1, 1, T, S)
    probs = scores.softmax(dim=-1).to(v.dtype)
    if weight is not None:
        probs = probs * weight.unflatten(1, (kv_heads, groups))  # weight (B, kv_heads, groups, 1, 1)
    return (probs.flatten(2, 3) @ v).view(batch, heads, length, head_dim)


KERNELS: dict[str, Callable[..., torch.Tensor]] = {"sdpa": sdpa_attention, "grouped": grouped_attention}


def best_time(run: Callable[[], object], repeats: int = 2, min_seconds: float = 2e-4,
              budget_seconds: float = 0.02) -> float:
    """Seconds per call of `run` on the CPU: one warm-up call, then the best of `repeats` timings, each looping the
    call until it lasts `min_seconds`. A warm-up slower than `budget_seconds` is taken as the answer, so that a
    pathologically slow candidate costs one call."""
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    if first > budget_seconds:
        return first
    loops = max(1, min(100, math.ceil(min_seconds / max(first, 1e-7))))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            run()
        best = min(best, (time.perf_counter() - start) / loops)
    return best


def fastest(candidates: Mapping[K, Callable[[], object]], tolerance: float = 0.0, rounds: int = 2,
            timer: Callable[[Callable[[], object]], float] = best_time) -> K:
    """The key of the candidate that runs fastest here and now, timed by `timer` in `rounds` alternating rounds.

    The first candidate is the default. Another can win only when it is faster than the default by more than
    `tolerance` (a fraction) in every round, so that noise (another process taking a core in one round) keeps the
    default rather than picking at random; of those, the one whose slowest round is fastest wins. (Ranking by the
    single best round instead would let one lucky round of a candidate that loses the other hide a steady winner.)
    """
    times = [{key: timer(run) for key, run in candidates.items()} for _ in range(rounds)]
    default = next(iter(candidates))
    steady = [key for key in candidates if all(t[key] < t[default] * (1 - tolerance) for t in times)]
    return min(steady, key=lambda key: max(t[key] for t in times)) if steady else default


def bucket(n: int) -> int:
    """n rounded up to a power of two: the shape class of a length."""
    return 1 << max(0, n - 1).bit_length()


class AttentionPaths:
    """Which path computes a masked (cached or padded) token attention, chosen once per shape class.

    By capability first: SDPA while gradients are recorded (training), under torch.compile, for the causal case
    (its fused causal kernel) and off the CPU (where it dispatches to fused kernels). Otherwise, on the CPU, the
    first call of a shape class (dtype, batch, heads, kv_heads, head_dim, T and S rounded up to powers of two, torch
    threads) times both paths on its own inputs (`fastest`: a few ms) and keeps the written-out path for the process
    only when it is faster than SDPA by more than `TOLERANCE`. Both paths give the same values up to rounding.
    """

    def __init__(self) -> None:
        self.choices: dict[tuple, AttentionPath] = {}
        self.forced: Optional[AttentionPath] = None

    def choose(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> AttentionPath:
        if self.forced is not None:
            return self.forced
        if mask is None or torch.is_grad_enabled() or q.device.type != "cpu" or torch.compiler.is_compiling():
            return "sdpa"
        batch, heads, length, head_dim = q.shape
        key = (q.dtype, batch, heads, k.shape[1], head_dim, bucket(length), bucket(k.shape[2]),
               torch.get_num_threads())
        if key not in self.choices:
            self.choices[key] = self.probe(q, k, v, mask)
        return self.choices[key]

    @staticmethod
    def probe(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> AttentionPath:
        candidates = {name: lambda kernel=kernel: kernel(q, k, v, mask) for name, kernel in KERNELS.items()}
        return fastest(candidates, TOLERANCE, timer=partial(best_time, budget_seconds=PROBE_BUDGET_SECONDS))

    @contextmanager
    def force(self, path: Optional[AttentionPath]) -> Iterator[None]:
        """Within: every call takes `path` (for tests and benchmarks comparing the paths)."""
        previous, self.forced = self.forced, path
        try:
            yield
        finally:
            self.forced = previous


ATTENTION_PATHS = AttentionPaths()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v [B, heads, T, head_dim], causal when `mask` is None; shapes as in
    `sdpa_attention`. The path is `ATTENTION_PATHS`'s choice."""
    return KERNELS[ATTENTION_PATHS.choose(q, k, v, mask)](q, k, v, mask)


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b; while training, through `SiluMul`, which keeps one [tokens, hidden] tensor less for backward."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return SiluMul.apply(a, b)
    return F.silu(a) * b


class SiluMul(torch.autograd.Function):
    """silu(a) * b saving only a and b: silu(a) = a sigmoid(a) is recomputed in backward instead of being kept."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = ctx.saved_tensors
        sigmoid = torch.sigmoid(a)
        silu = a * sigmoid
        # d silu(a) / da = sigmoid(a) (1 + a (1 - sigmoid(a))) = sigmoid(a) (a - silu(a) + 1)
        grad_a = (a - silu + 1) * sigmoid * b * grad
        grad_b = grad * silu
        return grad_a, grad_b
