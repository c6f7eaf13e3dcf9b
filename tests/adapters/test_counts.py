"""Trainable parameter counts on LLaMA-7B and 65B (meta device), against closed forms written out here."""

from __future__ import annotations

import pytest
import torch

from lit_adapter.adapters import AdapterConfig, attach_adapters
from lit_adapter.adapters.visual import VisualConfig
from lit_adapter.config import ModelConfig
from lit_adapter.model import LLaMA

D, N, H, F = 4096, 32, 32, 11008  # LLaMA-7B: dim, layers, heads, FFN width
W, BLOCKS, QUERIES = 768, 8, 10  # official V2 visual adapter on CLIP ViT-L/14 (768-wide features)


def trainable(model_name: str, config: AdapterConfig) -> int:
    with torch.device("meta"):
        model = attach_adapters(LLaMA(ModelConfig.from_name(model_name)), config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def norms(d: int, n: int) -> int:
    return n * 2 * d + d  # attention_norm + ffn_norm per layer, plus the final norm


def prompts(layers: int, length: int = 10, d: int = D, heads: int = H) -> int:
    return layers * length * d + layers * heads  # prompts + one gate per head per layer


def paper_bias_scale(d: int, f: int, n: int) -> int:
    outputs = 4 * d + 2 * f + d  # wq, wk, wv, wo | w1, w3 | w2
    return n * 2 * outputs  # a bias and a scale per output channel


def official_7b_bias(d: int, f: int, n: int) -> int:
    return n * (d + d + f + d + f)  # wq, wo, w1, w2, w3


def official_65b_bias_scale(d: int, f: int, n: int) -> int:
    biases = 4 * d + 2 * f + d  # output channels
    scales = 4 * d + 2 * d + f  # input channels: wq, wk, wv, wo | w1, w3 | w2
    return n * (biases + scales)


def lora(rank: int, d: int = D, f: int = F, n: int = N) -> int:
    per_layer = 4 * (d + d) + 2 * (d + f) + (f + d)  # l1 [r, in] + l2 [out, r] for the seven linears
    return n * rank * per_layer


def visual_adapter(d: int = D) -> int:
    block = 12 * W * W + 13 * W  # norm1, qkv (bias), proj, norm2, fc1, fc2 of a ViT block with mlp ratio 4
    return (W * W + W) + 2 * W + QUERIES * W + BLOCKS * block + (W * d + d) + 2 * d


def record(name: str, count: int) -> None:
    print(f"7B trainable parameters, {name}: {count:,}")


def test_v1_on_7b():
    count = trainable("llama-7b", AdapterConfig.v1())
    assert count == prompts(30) == 300 * 4096 + 30 * 32 == 1_229_760
    record("V1 (L=30, K=10)", count)


def test_official_65b_bias_scale_and_norms_on_65b():
    config = AdapterConfig(adapter_layers=0, bias_mode="official_65b", train_norms=True)
    count = trainable("llama-65b", config)
    assert count == official_65b_bias_scale(8192, 22016, 80) + norms(8192, 80) == 13_811_712


@pytest.mark.parametrize(
    ("mode", "linears"),
    [
        ("paper", paper_bias_scale(D, F, N)),
        ("official_7b", official_7b_bias(D, F, N)),
        ("official_65b", official_65b_bias_scale(D, F, N)),
    ],
)
def test_v2_bias_modes_on_7b(mode, linears):
    count = trainable("llama-7b", AdapterConfig.v2(bias_mode=mode))
    assert count == prompts(31) + linears + norms(D, N)
    record(f"V2 text, bias_mode {mode} (L=31, K=10, norms)", count)


def test_v2_with_lora_on_7b():
    config = AdapterConfig.v2(bias_mode="official_7b", lora_rank=16, new_gate=True)  # official LORA-BIAS-7B
    count = trainable("llama-7b", config)
    assert count == prompts(31) + 31 + official_7b_bias(D, F, N) + norms(D, N) + lora(16)
    record("V2 + LoRA(16), official_7b bias, new_gate", count)


@pytest.mark.parametrize(
    ("fusion", "bias_mode", "linears"),
    [
        ("early", "paper", paper_bias_scale(D, F, N)),  # the paper's V2
        ("late", "paper", paper_bias_scale(D, F, N)),
        ("late", "official_7b", official_7b_bias(D, F, N)),  # the layout of the official BIAS-7B release
    ],
)
def test_v2_multimodal_on_7b(fusion, bias_mode, linears):
    visual = VisualConfig(clip_model="ViT-L-14", clip_pretrained=None)  # the CLIP tower is frozen: not counted
    count = trainable("llama-7b", AdapterConfig.v2(visual=visual, fusion=fusion, bias_mode=bias_mode))
    early_gates = H if fusion == "early" else 0  # the first layer's visual prompt has its own gate
    assert count == prompts(31) + linears + norms(D, N) + visual_adapter() + early_gates
    record(f"V2 multimodal, {fusion} fusion, bias_mode {bias_mode} (ViT-L/14 adapter, norms)", count)
