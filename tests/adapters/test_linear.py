"""V2 bias/scale forms and LoRA: formulas, targets, key names, folding, initial values after meta-device init."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.adapters import AdapterConfig, attach_adapters
from lit_adapter.adapters.linear import AdaptedLinear
from lit_adapter.config import ModelConfig
from lit_adapter.model import LLaMA, RMSNorm
from tests.adapters.helpers import tiny_visual

ALL = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def random_linear(seed: int = 0, **kwargs) -> AdaptedLinear:
    torch.manual_seed(seed)
    module = AdaptedLinear(nn.Linear(6, 5, bias=False), **kwargs)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name != "weight":
                param.copy_(torch.randn_like(param))
    return module


@pytest.mark.parametrize(
    ("kwargs", "formula"),
    [
        (dict(bias=True, scale="out"), lambda x, w, p: p["scale"] * (x @ w.T + p["bias"])),  # paper
        (dict(bias=True), lambda x, w, p: x @ w.T + p["bias"]),  # official 7B
        (dict(bias=True, scale="in"), lambda x, w, p: (x * p["scale"]) @ w.T + p["bias"]),  # official 65B
        (dict(lora_rank=2), lambda x, w, p: x @ w.T + x @ p["lora_l1"].T @ p["lora_l2"].T),  # official LoRA
        (dict(lora_rank=2, lora_alpha=8.0), lambda x, w, p: x @ w.T + 4.0 * (x @ p["lora_l1"].T @ p["lora_l2"].T)),
        (dict(bias=True, scale="out", lora_rank=3),
         lambda x, w, p: p["scale"] * (x @ w.T + p["bias"]) + x @ p["lora_l1"].T @ p["lora_l2"].T),
    ],
)
def test_forms_match_their_formulas_and_fold_exactly(kwargs, formula):
    module = random_linear(**kwargs)
    x = torch.randn(3, 4, 6)
    params = {n: p.detach() for n, p in module.named_parameters()}
    expected = formula(x, module.weight.detach(), params)
    torch.testing.assert_close(module(x), expected, atol=1e-6, rtol=1e-6)
    weight, bias = module.folded()
    torch.testing.assert_close(F.linear(x, weight, bias), expected)  # float32 tolerance
    # in float64 the fold is exact up to rounding
    module, x = module.double(), x.double()
    params = {n: p.detach() for n, p in module.named_parameters()}
    expected = formula(x, module.weight.detach(), params)
    weight, bias = module.folded()
    torch.testing.assert_close(F.linear(x, weight, bias), expected, atol=1e-12, rtol=0)
    if "lora_rank" in kwargs:  # without the LoRA branch: the bias/scale form alone
        weight, bias = module.folded(lora=False)
        torch.testing.assert_close(F.linear(x, weight, bias), module(x, lora=False), atol=1e-12, rtol=0)


def test_initial_values_leave_the_output_bit_identical():
    base = nn.Linear(6, 5, bias=False)
    x = torch.randn(2, 7, 6)
    for kwargs in (dict(bias=True, scale="out"), dict(bias=True, scale="in"), dict(lora_rank=4, lora_alpha=2.0)):
        module = AdaptedLinear(base, **kwargs)
        assert module.weight is base.weight
        assert torch.equal(module(x), base(x))


@pytest.mark.parametrize(
    ("mode", "bias", "scale_in", "scale_out"),
    [
        ("paper", ALL, [], ALL),
        ("official_7b", ["wq", "wo", "w1", "w2", "w3"], [], []),
        ("official_65b", ALL, ALL, []),
        ("bias", ALL, [], []),
    ],
)
def test_each_bias_mode_adapts_the_documented_linears(mode, bias, scale_in, scale_out):
    config = ModelConfig.from_name("tiny-gqa")
    model = attach_adapters(LLaMA(config), AdapterConfig(adapter_layers=0, bias_mode=mode))
    state = model.state_dict()
    for i in range(config.n_layers):
        for name in ALL:
            parent = "attention" if name in ALL[:4] else "feed_forward"
            key = f"llama.layers.{i}.{parent}.{name}"
            linear = getattr(getattr(model.llama.layers[i], parent), name)
            assert f"{key}.weight" in state  # the base key is unchanged
            assert (f"{key}.bias" in state) == (name in bias)
            if name in scale_in:
                assert state[f"{key}.scale"].shape == (linear.in_features,)
            elif name in scale_out:
                assert state[f"{key}.scale"].shape == (linear.out_features,)
            else:
                assert f"{key}.scale" not in state
    assert not any("output.bias" in k or "output.scale" in k for k in state)


def test_lora_targets_and_shapes():
    config = ModelConfig.from_name("tiny-gqa")
    model = attach_adapters(LLaMA(config), AdapterConfig(adapter_layers=0, lora_rank=3, lora_targets=["wk", "w2"]))
    attention, ffn = model.llama.layers[1].attention, model.llama.layers[1].feed_forward
    assert attention.wk.lora_l1.shape == (3, 32) and attention.wk.lora_l2.shape == (16, 3)  # 2 KV heads x 8
    assert ffn.w2.lora_l1.shape == (3, 64) and ffn.w2.lora_l2.shape == (32, 3)
    assert not isinstance(attention.wq, AdaptedLinear) and not isinstance(ffn.w1, AdaptedLinear)


def test_freezing_and_train_norms():
    config = ModelConfig.from_name("tiny-gqa")
    model = attach_adapters(LLaMA(config), AdapterConfig.v2(adapter_len=2, lora_rank=2, new_gate=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {f"llama.{n}" for n, m in model.llama.named_modules() if isinstance(m, RMSNorm)}
    assert {f"{n}.weight" for n in norms} <= trainable and "llama.norm.weight" in trainable
    assert not any(n.endswith(".weight") and "norm" not in n for n in trainable)  # no base matrix trains
    assert set(model.adapter_names) == trainable


def test_reset_parameters_after_meta_device_construction():
    config = ModelConfig.from_name("tiny-gqa")
    adapter = AdapterConfig.v2(adapter_len=2, lora_rank=2, new_gate=True, visual=tiny_visual(), visual_layers=2)
    with torch.device("meta"):
        model = attach_adapters(LLaMA(config), adapter)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))  # what uninitialised memory may hold
    model.reset_parameters()
    params = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    for name, param in params.items():
        if name.endswith(("adaption_prompt.gate", "visual_gate", ".bias")) and name.startswith("llama."):
            assert torch.equal(param, torch.zeros_like(param)), name
        elif name.endswith((".scale", "new_gate")):
            assert torch.equal(param, torch.ones_like(param)), name
        elif name.endswith("lora_l2"):
            assert torch.equal(param, torch.zeros_like(param)), name
        elif name.endswith(("lora_l1", ".prompt")):
            assert param.abs().sum() > 0, name
    # the per-module resets (what FSDP calls after materialising a module) give the same initial values
    model.to_empty(device="cpu")
    for module in model.llama.modules():
        if hasattr(module, "reset_parameters") and list(module.parameters(recurse=False)):
            module.reset_parameters()
    assert torch.equal(params["llama.layers.1.attention.adaption_prompt.gate"], torch.zeros(1, 4, 1, 1))
    assert torch.equal(params["llama.layers.0.feed_forward.w2.scale"], torch.ones(32))
