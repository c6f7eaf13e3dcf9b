"""AdapterModel: the one build (devices, dtype policy), loading (one build, one strict check) and its errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import lit_adapter.adapters.model as model_module
from lit_adapter.adapters import (
    AdapterConfig,
    AdapterModel,
    attach_adapters,
    build_adapter_model,
    load_adapter,
    load_adapter_model,
    save_adapter,
)
from lit_adapter.checkpoint import load_model
from lit_adapter.config import ModelConfig
from lit_adapter.errors import LitAdapterError
from lit_adapter.model import LLaMA
from tests.adapters.helpers import DIM, IDS, MODES, images, one_line_error, randomize, tiny_visual

# ---------------------------------------------------------------------------------------------------------- build


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_build_loads_the_base_in_its_dtype_and_every_adapter_parameter_in_float32(stories260k_dir, dtype):
    config = AdapterConfig.v2(adapter_len=3, lora_rank=2, new_gate=True, visual=tiny_visual(), visual_layers=2)
    model = build_adapter_model(stories260k_dir, config, dtype=dtype)
    base = load_model(stories260k_dir)
    adapter = set(model.adapter_names)
    assert "llama.norm.weight" in adapter and any(name.startswith("visual.") for name in adapter)
    for name, param in model.named_parameters():
        if name in adapter:
            assert param.dtype == torch.float32 and param.requires_grad, name
        elif name.startswith("visual.clip."):
            assert param.dtype == torch.float32 and not param.requires_grad, name  # the frozen tower
        else:
            assert param.dtype == dtype and not param.requires_grad, name
    for name, tensor in base.state_dict().items():  # the frozen weights (and the norms' start) are the file's
        assert torch.equal(model.llama.state_dict()[name].float(), tensor.to(dtype).float()), name


def test_meta_build_has_the_structure_without_weights_or_clip_tower(stories260k_dir):
    config = AdapterConfig.v2(adapter_len=3, visual=tiny_visual(), visual_layers=2)
    model = build_adapter_model(stories260k_dir, config, device="meta", dtype=torch.bfloat16)
    assert model.visual is not None and model.visual.clip is None
    assert all(p.is_meta for p in model.parameters())
    assert {p.dtype for n, p in model.named_parameters() if n not in model.adapter_names} == {torch.bfloat16}
    assert {p.dtype for p in model.adapter_parameters().values()} == {torch.float32}
    eager = build_adapter_model(stories260k_dir, config)
    assert model.adapter_shapes() == eager.adapter_shapes()


def test_build_from_the_folder_equals_attaching_to_the_loaded_base(stories260k_dir):
    torch.manual_seed(0)
    built = build_adapter_model(stories260k_dir, MODES["v2-lora"])
    torch.manual_seed(0)
    attached = attach_adapters(load_model(stories260k_dir), MODES["v2-lora"])
    assert isinstance(built, AdapterModel) and built.adapter_names == attached.adapter_names
    with torch.no_grad():
        assert torch.equal(built(IDS), attached(IDS))


def test_build_still_takes_a_llama_for_now(stories260k):
    model = build_adapter_model(stories260k, MODES["v1"])  # the former signature, until its callers move
    assert model.llama is stories260k and model.adapter_config == MODES["v1"]


# ----------------------------------------------------------------------------------------------------------- load


def test_round_trip_restores_the_model_exactly(stories260k_dir, tmp_path, clip_weights):
    config = AdapterConfig.v2(adapter_len=3, lora_rank=2, new_gate=True, visual=tiny_visual(
        clip_pretrained=clip_weights), visual_layers=2, prompt_style="chat")
    model = build_adapter_model(stories260k_dir, config)
    randomize(model)
    pics = images()
    expected = model(IDS, images=pics)
    save_adapter(model, tmp_path / "adapter")

    loaded = load_adapter_model(stories260k_dir, tmp_path / "adapter")
    assert loaded.adapter_config == config and not loaded.training
    assert torch.equal(loaded(IDS, images=pics), expected)
    # the .safetensors path works too, and so does loading onto an AdapterModel built with the same config
    again = load_adapter(build_adapter_model(stories260k_dir, config), tmp_path / "adapter" / "adapter.safetensors")
    assert torch.equal(again(IDS, images=pics), expected)


def test_loading_builds_once(stories260k_dir, tmp_path, monkeypatch):
    model = build_adapter_model(stories260k_dir, MODES["v2-lora"])
    randomize(model)
    save_adapter(model, tmp_path / "adapter")
    calls = []
    attach = model_module.attach_adapters
    monkeypatch.setattr(model_module, "attach_adapters", lambda *args, **kw: calls.append(1) or attach(*args, **kw))
    model = load_adapter_model(stories260k_dir, tmp_path / "adapter")
    assert len(calls) == 1 and model.adapter_config == MODES["v2-lora"]
    plain = load_adapter_model(stories260k_dir)
    assert plain.adapter_names == [] and len(calls) == 2


def test_adapter_for_another_base_model_fails_with_one_line(stories260k, tmp_path):
    save_adapter(attach_adapters(stories260k, MODES["v1"]), tmp_path / "adapter")
    other = LLaMA(ModelConfig.from_name("tiny", n_layers=5))
    with pytest.raises(LitAdapterError) as err:
        load_adapter(other, tmp_path / "adapter")
    one_line_error(err, "adapter_config.yaml", "made for base model 'stories260K'")


def test_wrong_shape_missing_or_unexpected_keys_name_the_key(stories260k, tmp_path):
    model = attach_adapters(stories260k, MODES["v1"])
    save_adapter(model, tmp_path / "adapter")
    good = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    key = "llama.layers.3.attention.adaption_prompt.prompt"
    cases = [
        ({**good, key: torch.zeros(5, DIM)}, [f"{key!r}", "[5, 64]", "[4, 64]"]),
        ({k: v for k, v in good.items() if k != key}, ["missing key", f"{key!r}"]),
        ({**good, "llama.layers.0.attention.wq.bias": torch.zeros(DIM)}, ["unexpected key",
                                                                          "'llama.layers.0.attention.wq.bias'"]),
    ]
    for tensors, parts in cases:
        save_file(tensors, str(tmp_path / "adapter" / "adapter.safetensors"))
        with pytest.raises(LitAdapterError) as err:
            load_adapter(LLaMA(stories260k.config), tmp_path / "adapter")
        one_line_error(err, "adapter.safetensors", *parts)


def test_an_adapter_model_with_another_config_is_refused(stories260k, tmp_path):
    save_adapter(attach_adapters(load_model_like(stories260k), MODES["v2-paper"]), tmp_path / "adapter")
    with pytest.raises(LitAdapterError) as err:
        load_adapter(attach_adapters(stories260k, MODES["v2-official_65b"]), tmp_path / "adapter")
    one_line_error(err, "bias_mode is 'paper'", "'official_65b'")


def load_model_like(model: LLaMA) -> LLaMA:
    copy = LLaMA(model.config)
    copy.load_state_dict(model.state_dict())
    return copy
