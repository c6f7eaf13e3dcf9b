"""AdapterConfig: presets, validation with one-line errors, yaml round trip."""

from __future__ import annotations

import pytest
import yaml

from lit_adapter.adapters import AdapterConfig
from lit_adapter.adapters.visual import VisualConfig
from lit_adapter.config import ModelConfig
from lit_adapter.errors import LitAdapterError
from tests.adapters.helpers import tiny_visual


def test_presets():
    v1 = AdapterConfig.v1()
    assert (v1.adapter_len, v1.adapter_layers, v1.bias_mode, v1.gate_activation) == (10, 30, "none", "tanh")
    assert list(v1.static_layers(32)) == list(range(2, 32))
    v2 = AdapterConfig.v2()
    assert (v2.bias_mode, v2.train_norms, v2.fusion) == ("paper", True, "early")
    assert list(v2.static_layers(32)) == list(range(1, 32)) and list(v2.static_layers(5)) == [1, 2, 3, 4]
    assert AdapterConfig.v1(visual=tiny_visual(mode="global")).fusion == "late"  # V1 multimodal
    early = AdapterConfig.v2(visual=tiny_visual(), visual_layers=2)
    assert list(early.visual_prompt_layers(5)) == [0, 1]
    assert list(AdapterConfig.v2(visual=tiny_visual(), fusion="late", adapter_len=3).visual_prompt_layers(5)) == []


def test_yaml_round_trip():
    config = AdapterConfig.v2(lora_rank=4, lora_alpha=8.0, lora_targets=["wq", "wv"], visual=tiny_visual(),
                              prompt_style="chat")
    text = yaml.safe_dump(config.to_dict())
    again = AdapterConfig.from_dict(yaml.safe_load(text))
    assert again == config and isinstance(again.visual, VisualConfig)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(adapter_len=0), "adapter_len must be at least 1"),
        (dict(gate_activation="sigmoid"), "gate_activation must be one of"),
        (dict(bias_mode="full"), "bias_mode must be one of"),
        (dict(lora_rank=-1), "lora_rank"),
        (dict(lora_rank=4, lora_targets=["wq", "output"]), "lora_targets: unknown ['output']"),
        (dict(lora_rank=4, lora_targets=[]), "at least one name"),
        (dict(lora_alpha=0.0), "lora_alpha must be positive"),
        (dict(fusion="middle"), "fusion must be one of"),
        (dict(visual_layers=0), "visual_layers"),
        (dict(visual=tiny_visual(), fusion="late", adapter_len=10), "visual_len must equal adapter_len"),
        (dict(visual=tiny_visual(), fusion="late", adapter_len=3, adapter_layers=0), "adapter_layers must not be 0"),
    ],
)
def test_invalid_configs_fail_with_one_line(overrides, message):
    with pytest.raises(LitAdapterError) as err:
        AdapterConfig(**overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_config_must_fit_the_model():
    model = ModelConfig.from_name("stories260K")
    with pytest.raises(LitAdapterError, match="adapter_layers 30 exceeds the 5 layers of 'stories260K'"):
        AdapterConfig.v1().check_model(model)
    with pytest.raises(LitAdapterError, match="visual_layers 6 exceeds"):
        AdapterConfig.v2(visual=tiny_visual(), visual_layers=6).check_model(model)


def test_from_dict_names_the_source_and_unknown_keys():
    with pytest.raises(LitAdapterError, match=r"a\.yaml: unknown keys \['adapter_length'\]"):
        AdapterConfig.from_dict({"adapter_length": 3}, source="a.yaml")
    with pytest.raises(LitAdapterError, match=r"a\.yaml: bias_mode must be one of"):
        AdapterConfig.from_dict({"bias_mode": "x"}, source="a.yaml")
