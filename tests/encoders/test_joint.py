"""Mixing weights and cache retrieval against a hand computation of the official formulas."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
from safetensors.torch import save_file

from lit_adapter.encoders.joint import CacheSettings, EmbeddingCache, blend, blend_keep_norm, load_cache, mix
from lit_adapter.errors import LitAdapterError


def test_mixing_normalises_each_input_and_the_weights_as_the_official_code():
    a, b = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 2.0]])
    # e = [0.6, 0.8] and [0, 1]; weights 0.5 and 1.5 -> 0.5 / 2.000001 and 1.5 / 2.000001
    w1, w2 = 0.5 / (2 + 1e-6), 1.5 / (2 + 1e-6)
    expected = torch.tensor([[0.6 * w1, 0.8 * w1 + w2]])
    torch.testing.assert_close(mix([a, b], [0.5, 1.5]), expected)
    torch.testing.assert_close(mix([a], [1.0]), torch.tensor([[0.6, 0.8]]) / (1 + 1e-6))  # not renormalised
    torch.testing.assert_close(mix([a, b], [1.0, 1.0], normalize=False), (a + b) / (2 + 1e-6))


def test_retrieval_against_a_hand_computation(tmp_path):
    stored = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0]])
    save_file({"embeddings": stored}, tmp_path / "cache.safetensors")
    cache = load_cache(tmp_path / "cache.safetensors")
    f = torch.tensor([[0.8, 0.6, 0.0]])
    # inner products 0.8, 0.6, 0, 0.96: the top 2 are rows 3 (0.96) and 0 (0.8)
    s1, s2 = 0.96, 0.8
    a1, a2 = math.exp(20 * s1) / (math.exp(20 * s1) + math.exp(20 * s2)), math.exp(20 * s2) / (
        math.exp(20 * s1) + math.exp(20 * s2))
    r = torch.tensor([a1 * 0.6 + a2 * 1.0, a1 * 0.8, 0.0])
    r = r / r.norm()
    out = 0.7 * f[0] + 0.3 * r
    expected = (out / out.norm())[None]
    settings = CacheSettings(cache_size=2, cache_t=20.0, cache_weight=0.3)
    torch.testing.assert_close(blend(f, cache, settings), expected)
    # the image-output form keeps the length of an unnormalised embedding
    torch.testing.assert_close(blend_keep_norm(5 * f, cache, settings), 5 * expected)
    # two rows are weighted by their own scores
    g = torch.tensor([[0.0, 0.0, 1.0]])
    both = blend(torch.cat([f, g]), cache, settings)
    torch.testing.assert_close(both, torch.cat([blend(f, cache, settings), blend(g, cache, settings)]))


def test_faiss_index_gives_the_same_blend(tmp_path):
    faiss = pytest.importorskip("faiss")
    stored = torch.nn.functional.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    index = faiss.IndexFlatIP(8)
    index.add(stored.numpy())
    faiss.write_index(index, str(tmp_path / "knn.index"))
    f = torch.nn.functional.normalize(torch.randn(2, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    settings = CacheSettings(cache_size=5)
    torch.testing.assert_close(blend(f, load_cache(tmp_path / "knn.index"), settings),
                               blend(f, EmbeddingCache(stored), settings), atol=1e-6, rtol=1e-5)


def test_bad_caches_are_one_line(tmp_path):
    with pytest.raises(LitAdapterError, match="none.safetensors: cache index not found"):
        load_cache(tmp_path / "none.safetensors")
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(3)}, tmp_path / "two.safetensors")
    with pytest.raises(LitAdapterError, match="two.safetensors: expected one"):
        load_cache(tmp_path / "two.safetensors")
    with pytest.raises(LitAdapterError, match="holds 3-wide embeddings"):
        EmbeddingCache(torch.zeros(2, 3), source="c").search(torch.zeros(1, 4), 1)
    with pytest.raises(LitAdapterError, match="cache_weight"):
        CacheSettings(cache_weight=2.0)


@pytest.mark.parametrize("command", ["lit_adapter.inference.cli:generate", "lit_adapter.inference.cli:chat",
                                     "lit_adapter.serving.cli:serve"])
def test_the_commands_retrieval_defaults_are_the_official_ones(command):
    """The --cache_* defaults each command shows in its help are CacheSettings' (the official 10, 20, 0.5)."""
    import importlib

    module, name = command.split(":")
    parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    official = {field.name: field.default for field in dataclasses.fields(CacheSettings)}
    assert official == {"cache_size": 10, "cache_t": 20.0, "cache_weight": 0.5}
    assert {key: parameters[key].default for key in official} == official
