"""`lit-adapter export --format peft`: V1 prompts (equal gates per layer) as PEFT's ADAPTION_PROMPT and LoRA as
PEFT's LORA, on an exported base that holds the folded bias/scale and norms. PEFT itself loads each folder onto the
transformers base and gives our fp32 logits within 1e-5; read back through `--adapter`, the tensors are bitwise
those exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_adapter.adapters import AdapterConfig, build_adapter_model, load_adapter_model, read_adapter, save_adapter
from lit_adapter.checkpoint import load_config
from lit_adapter.convert.export import export
from lit_adapter.errors import LitAdapterError
from tests.adapters.helpers import randomize
from tests.convert.test_export_hf import token_ids

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Tiny models: one torch thread."""


def v1_adapter(folder: Path, out: Path, gate_shape: str = "head", equal_gates: bool = True,
               activation: str = "tanh") -> Path:
    """A V1 adapter on the top 3 layers; gates equal across each layer's heads unless `equal_gates` is False."""
    config = AdapterConfig.v1(adapter_layers=3, adapter_len=4, gate_shape=gate_shape, gate_activation=activation)
    model = build_adapter_model(folder, config).eval()
    randomize(model, seed=4)
    with torch.no_grad():
        for i, block in enumerate(model.llama.layers):
            prompt = block.attention.adaption_prompt
            if prompt is not None and equal_gates:
                prompt.gate.fill_(0.3 + 0.2 * i)
    save_adapter(model, out)
    return out


def peft_logits(out: Path, tokens: torch.Tensor) -> torch.Tensor:
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def our_logits(folder: Path, adapter: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_adapter_model(folder, adapter)(tokens)


def assert_close(folder: Path, adapter: Path, out: Path, tokens: torch.Tensor, label: str) -> None:
    """PEFT's fp32 logits within 1e-5 of ours, or within twice our own fp32 rounding (|fp32 - fp64| of our model)
    where the logits are large enough for that to exceed 1e-5."""
    model = load_adapter_model(folder, adapter)
    with torch.no_grad():
        ours = model(tokens)
        rounding = float((ours.double() - model.double()(tokens)).abs().max())
    diff = float((ours - peft_logits(out, tokens)).abs().max())
    print(f"{label}: max |logits diff| {diff:.2e} (our own fp32 rounding {rounding:.2e}, logits up to "
          f"{float(ours.abs().max()):.1f})")
    assert diff <= max(TOLERANCE, 2 * rounding)


def test_v1_with_equal_gates_exports_as_adaption_prompt(stories260k_dir: Path, tmp_path: Path) -> None:
    adapter = v1_adapter(stories260k_dir, tmp_path / "v1")
    out = export(stories260k_dir, tmp_path / "peft", adapter=adapter, format="peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADAPTION_PROMPT" and config["adapter_layers"] == 3 and config["adapter_len"] == 4
    tokens = token_ids()
    assert_close(stories260k_dir, adapter, out, tokens, "V1 -> PEFT ADAPTION_PROMPT")
    moved = our_logits(stories260k_dir, adapter, tokens) - our_logits(stories260k_dir, None, tokens)
    assert float(moved.abs().max()) > 1e-2, "the prompts must change the logits"


def test_per_layer_gates_round_trip_bitwise(stories260k_dir: Path, tmp_path: Path) -> None:
    """gate_shape layer with raw gates (PEFT's own form): export, then read the PEFT folder through --adapter."""
    adapter = v1_adapter(stories260k_dir, tmp_path / "v1", gate_shape="layer", equal_gates=False,
                         activation="identity")
    out = export(stories260k_dir, tmp_path / "peft", adapter=adapter, format="peft")
    base = load_config(stories260k_dir)
    original, back = read_adapter(adapter, base), read_adapter(out, base)
    assert back.kind == "peft" and back.config.gate_shape == "layer" and back.config.gate_activation == "identity"
    assert back.tensors.keys() == original.tensors.keys()
    for key, tensor in original.tensors.items():
        assert torch.equal(back.tensors[key], tensor), key
    assert_close(stories260k_dir, adapter, out, token_ids(seed=3), "per-layer gates -> PEFT")


def test_unequal_head_gates_are_refused(stories260k_dir: Path, tmp_path: Path) -> None:
    adapter = v1_adapter(stories260k_dir, tmp_path / "v1", equal_gates=False)
    with pytest.raises(LitAdapterError, match="the heads' gates differ.*gate_shape: layer"):
        export(stories260k_dir, tmp_path / "peft", adapter=adapter, format="peft")


def lora_adapter(folder: Path, out: Path, **fields) -> Path:
    config = AdapterConfig(adapter_layers=0, lora_rank=3, lora_alpha=6.0, **fields)
    model = build_adapter_model(folder, config).eval()
    randomize(model, seed=5, scale=0.05)
    save_adapter(model, out)
    return out


def test_lora_with_bias_scale_and_norms_exports_as_peft_lora(stories260k_dir: Path, tmp_path: Path) -> None:
    """bias/scale and norms go into OUT/base; the LoRA (q/k lora_B rows permuted per head) into PEFT's files."""
    adapter = lora_adapter(stories260k_dir, tmp_path / "lora", bias_mode="paper", train_norms=True)
    out = export(stories260k_dir, tmp_path / "peft", adapter=adapter, format="peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == 6.0
    assert json.loads((out / "base" / "config.json").read_text())["attention_bias"]
    assert_close(stories260k_dir, adapter, out, token_ids(seed=1), "V2 + LoRA -> base + PEFT LORA")


def test_lora_round_trip_bitwise(stories260k_dir: Path, tmp_path: Path) -> None:
    adapter = lora_adapter(stories260k_dir, tmp_path / "lora", lora_targets=["wq", "wk", "wv", "w2"])
    out = export(stories260k_dir, tmp_path / "peft", adapter=adapter, format="peft")
    base = load_config(stories260k_dir)
    original, back = read_adapter(adapter, base), read_adapter(out / "adapter_model.safetensors", base)
    assert back.config.lora_rank == 3 and back.config.lora_alpha == 6.0
    assert back.config.lora_targets == ["wq", "wk", "wv", "w2"]
    assert back.tensors.keys() == original.tensors.keys()
    for key, tensor in original.tensors.items():
        assert torch.equal(back.tensors[key], tensor), key
    assert_close(stories260k_dir, adapter, out, token_ids(seed=2), "LoRA -> PEFT LORA")
