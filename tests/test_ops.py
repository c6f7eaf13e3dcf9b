"""The fast kernels equal their plain formulas (float64), and the attention probe picks a path that agrees."""

from __future__ import annotations

import math
import time
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from lit_adapter import ops


def plain_attention(q, k, v, mask=None, causal=False, weight=None) -> torch.Tensor:
    """weight * softmax(q k^T / sqrt(d) + mask) v with the key heads repeated for their query heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    return (probs if weight is None else weight * probs) @ v


def inputs(kv_heads: int, batch: int = 2, length: int = 3, keys: int = 5, dtype=torch.float64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 4, length, 8, generator=generator, dtype=dtype)
    k, v = torch.randn(2, batch, kv_heads, keys, 8, generator=generator, dtype=dtype).unbind(0)
    mask = torch.rand(batch, 1, length, keys, generator=generator) > 0.4
    mask[..., 0] = True  # every query sees at least one key
    return q, k, v, mask


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["plain", "gqa", "mqa"])
def test_both_attention_paths_equal_the_plain_formula(kv_heads: int) -> None:
    q, k, v, mask = inputs(kv_heads)
    expected = plain_attention(q, k, v, mask=mask)
    torch.testing.assert_close(ops.grouped_attention(q, k, v, mask=mask), expected)
    torch.testing.assert_close(ops.sdpa_attention(q, k, v, mask=mask), expected)
    q, k, v, _ = inputs(kv_heads, length=5)
    torch.testing.assert_close(ops.sdpa_attention(q, k, v), plain_attention(q, k, v, causal=True))  # no mask: causal
    torch.testing.assert_close(ops.grouped_attention(q, k, v), plain_attention(q, k, v))  # no mask: none


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["plain", "gqa", "mqa"])
def test_grouped_attention_weights_heads_and_broadcasts_keys(kv_heads: int) -> None:
    q, k, v, mask = inputs(kv_heads)
    weight = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    expected = plain_attention(q, k[:1], v[:1], weight=weight)  # one set of keys for the whole batch
    torch.testing.assert_close(ops.grouped_attention(q, k[:1], v[:1], weight=weight), expected)
    per_row = torch.randn(2, 4, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(ops.grouped_attention(q, k, v, mask=mask, weight=per_row),
                               plain_attention(q, k, v, mask=mask, weight=per_row))
    unmasked = F.scaled_dot_product_attention(q, k[:1], v[:1], enable_gqa=kv_heads != 4)
    torch.testing.assert_close(ops.grouped_attention(q, k[:1], v[:1], weight=weight), weight * unmasked)


def test_grouped_attention_reads_a_kv_cache_slice_in_place() -> None:
    q, k, v, mask = inputs(2, keys=5)
    cache_k = torch.zeros(2, 2, 9, 8, dtype=torch.float64)
    cache_v = torch.zeros_like(cache_k)
    cache_k[:, :, :5], cache_v[:, :, :5] = k, v
    got = ops.grouped_attention(q, cache_k[:, :, :5], cache_v[:, :, :5], mask=mask)  # strided views
    torch.testing.assert_close(got, plain_attention(q, k, v, mask=mask))


@pytest.mark.parametrize("path", ["sdpa", "grouped"])
def test_attention_takes_a_forced_path_and_equals_the_formula(path: str) -> None:
    q, k, v, mask = inputs(2)
    with torch.inference_mode(), ops.ATTENTION_PATHS.force(path):
        assert ops.ATTENTION_PATHS.choose(q, k, v, mask) == path
        torch.testing.assert_close(ops.attention(q, k, v, mask), plain_attention(q, k, v, mask=mask))
    assert ops.ATTENTION_PATHS.forced is None


def test_probe_picks_a_path_once_per_shape_class(monkeypatch: pytest.MonkeyPatch) -> None:
    paths = ops.AttentionPaths()
    probed = []
    original = paths.probe
    monkeypatch.setattr(paths, "probe", lambda *args: probed.append(args[0].shape) or original(*args))
    q, k, v, mask = inputs(2, batch=3, dtype=torch.bfloat16)
    with torch.inference_mode():
        choice = paths.choose(q, k, v, mask)
        assert choice in ("sdpa", "grouped")
        assert paths.choose(q, k, v, mask) == choice and len(probed) == 1  # cached for the process
        paths.choose(q, k[:, :, :4], v[:, :, :4], mask[..., :4])  # 4 keys: another class (5 keys count as 8)
        assert len(probed) == 2
        paths.choose(q, torch.cat([k, k[:, :, :2]], 2), torch.cat([v, v[:, :, :2]], 2),
                     torch.cat([mask, mask[..., :2]], -1))  # 7 keys: the class of 5 (up to 8)
        assert len(probed) == 2
        assert paths.choose(q, k, v, None) == "sdpa"  # causal: SDPA's fused kernel, no probe
    assert paths.choose(q, k, v, mask) == "sdpa"  # recording gradients: SDPA
    assert len(probed) == 2


def test_probed_attention_equals_both_paths() -> None:
    q, k, v, mask = inputs(1, batch=8, length=1, keys=40, dtype=torch.bfloat16)
    paths = ops.AttentionPaths()
    with torch.inference_mode():
        choice = paths.choose(q, k, v, mask)
        assert paths.choices and set(paths.choices.values()) == {choice}
        exact = plain_attention(q.double(), k.double(), v.double(), mask=mask)
        for kernel in ops.KERNELS.values():
            torch.testing.assert_close(kernel(q, k, v, mask).double(), exact, rtol=0.02, atol=0.02)  # bf16 rounding


def test_fastest_picks_the_faster_and_keeps_the_default_on_a_tie() -> None:
    assert ops.fastest({"slow": lambda: time.sleep(0.002), "fast": lambda: None}) == "fast"
    assert ops.fastest({"slow": lambda: time.sleep(0.002), "fast": lambda: None}, tolerance=1.0) == "slow"
    calls: list[Optional[int]] = []
    assert ops.best_time(lambda: calls.append(None)) < 1e-3 and len(calls) > 2  # fast calls are looped


def test_silu_mul_values_and_gradients() -> None:
    a = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(ops.silu_mul(a, b), F.silu(a) * b)
    assert torch.autograd.gradcheck(ops.SiluMul.apply, (a, b))
    assert ops.silu_mul(a, b).grad_fn.name() == "SiluMulBackward"
    with torch.no_grad():
        torch.testing.assert_close(ops.silu_mul(a, b), F.silu(a) * b)
    grad = torch.randn(5, 7, dtype=torch.float64)
    expected = torch.autograd.grad(F.silu(a) * b, (a, b), grad)
    torch.testing.assert_close(torch.autograd.grad(ops.silu_mul(a, b), (a, b), grad), expected)


def test_fastest_prefers_a_steady_winner_to_one_lucky_round() -> None:
    # seconds each candidate takes in round 1 and round 2: "lucky" has the best single round but loses round 2
    rounds = {"default": iter([10.0, 10.0]), "lucky": iter([5.0, 12.0]), "steady": iter([8.0, 8.5])}
    candidates = {key: (lambda values=values: next(values)) for key, values in rounds.items()}
    assert ops.fastest(candidates, tolerance=0.05, timer=lambda run: run()) == "steady"


def test_fastest_keeps_the_default_when_no_candidate_wins_every_round() -> None:
    rounds = {"default": iter([10.0, 10.0]), "lucky": iter([5.0, 12.0]), "close": iter([9.8, 9.0])}
    candidates = {key: (lambda values=values: next(values)) for key, values in rounds.items()}
    assert ops.fastest(candidates, tolerance=0.05, timer=lambda run: run()) == "default"
