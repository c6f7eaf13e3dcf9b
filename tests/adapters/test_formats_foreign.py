"""Foreign adapters through the same `--adapter`: PEFT ADAPTION_PROMPT and LORA folders written by PEFT itself on
the transformers export of the base give PEFT's logits in our model (1e-5); a folder made for another base fails in
one line naming the file's key; the CLI takes them as it takes ours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_adapter.adapters import load_adapter_model
from lit_adapter.checkpoint import load_config, save_checkpoint
from lit_adapter.config import ModelConfig
from lit_adapter.convert.export import export
from lit_adapter.errors import LitAdapterError
from tests.helpers import random_state_dict, run_main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOLERANCE = 1e-5
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Tiny models: one torch thread."""


@pytest.fixture(scope="module")
def hf_base(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K as a transformers folder (the base PEFT adapters are made on)."""
    return export(stories260k_dir, tmp_path_factory.mktemp("hf-base") / "hf", format="hf")


def max_diff(model, expected: torch.Tensor, label: str) -> float:
    """|PEFT's logits - ours|, checked within 1e-5, or within twice our own fp32 rounding (|fp32 - fp64| of our
    model) where the logits are large enough for that to exceed 1e-5."""
    with torch.no_grad():
        got = model(tokens())
        rounding = float((got.double() - model.double()(tokens())).abs().max())
    model.float()
    diff = float((got - expected).abs().max())
    print(f"{label}: max |logits diff| {diff:.2e} (our own fp32 rounding {rounding:.2e})")
    assert diff <= max(TOLERANCE, 2 * rounding)
    return diff


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (2, 14), generator=torch.Generator().manual_seed(seed))


def peft_model(hf_folder: Path, config):
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    return peft.get_peft_model(base, config).eval()


def save_peft_adaption_prompt(hf_folder: Path, out: Path, layers: int = 3) -> torch.Tensor:
    """A PEFT AdaptionPrompt with non-zero gates, saved by PEFT; returns its logits on `tokens()`."""
    model = peft_model(hf_folder, peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=layers,
                                                            task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("adaption_gate"):
                param.copy_(torch.randn(param.shape, generator=generator))
        logits = model(input_ids=tokens()).logits
    model.save_pretrained(out)
    return logits


def save_peft_lora(hf_folder: Path, out: Path) -> torch.Tensor:
    model = peft_model(hf_folder, peft.LoraConfig(r=2, lora_alpha=5, target_modules=HF_TARGETS, lora_dropout=0.0,
                                                  task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        logits = model(input_ids=tokens()).logits
    model.save_pretrained(out)
    return logits


def test_peft_adaption_prompt_folder_loads_with_peft_logits(stories260k_dir: Path, hf_base: Path,
                                                            tmp_path: Path) -> None:
    expected = save_peft_adaption_prompt(hf_base, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "ADAPTION_PROMPT"
    model = load_adapter_model(stories260k_dir, tmp_path / "peft")
    assert model.adapter_config.gate_shape == "layer" and model.adapter_config.adapter_layers == 3
    max_diff(model, expected, "PEFT ADAPTION_PROMPT")
    with torch.no_grad():
        moved = model(tokens()) - load_adapter_model(stories260k_dir)(tokens())
    assert float(moved.abs().max()) > 1e-2, "the prompts must change the logits"


def test_peft_lora_folder_loads_with_peft_logits(stories260k_dir: Path, hf_base: Path, tmp_path: Path,
                                                 capsys) -> None:
    expected = save_peft_lora(hf_base, tmp_path / "peft")
    model = load_adapter_model(stories260k_dir, tmp_path / "peft")
    assert model.adapter_config.lora_rank == 2 and model.adapter_config.lora_alpha == 5.0
    max_diff(model, expected, "PEFT LORA")
    # the same flag in the CLI: merge folds it into a folder that generates like the adapter
    code, _, stderr = run_main(["merge", "--checkpoint_dir", str(stories260k_dir), "--adapter",
                                str(tmp_path / "peft"), "--out_dir", str(tmp_path / "merged")], capsys)
    assert code == 0, stderr
    with torch.no_grad():
        merged = load_adapter_model(tmp_path / "merged")(tokens())
    assert float((merged - expected).abs().max()) <= 2e-4  # merged in float64, written in float32


def test_a_peft_folder_for_another_base_names_the_key(assets: Path, tmp_path: Path, stories260k_dir: Path) -> None:
    other = ModelConfig(vocab_size=512, dim=48, n_layers=5, n_heads=6, n_kv_heads=2, hidden_dim=80, max_seq_len=128)
    folder = save_checkpoint(tmp_path / "other", random_state_dict(other), other,
                             assets / "stories260K" / "tok512.model")
    save_peft_lora(export(folder, tmp_path / "other-hf", format="hf"), tmp_path / "peft")
    with pytest.raises(LitAdapterError) as err:
        load_adapter_model(stories260k_dir, tmp_path / "peft")
    message = str(err.value)
    print(message)
    assert "\n" not in message and "lora_A.weight" in message and "another base model" in message
    with pytest.raises(LitAdapterError, match="adapter_layers 6 exceeds the 5 layers"):
        from lit_adapter.adapters import read_adapter

        data = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        (tmp_path / "prompt").mkdir()
        (tmp_path / "prompt" / "adapter_config.json").write_text(json.dumps(
            {**data, "peft_type": "ADAPTION_PROMPT", "adapter_len": 4, "adapter_layers": 6}))
        (tmp_path / "prompt" / "adapter_model.safetensors").write_bytes(
            (tmp_path / "peft" / "adapter_model.safetensors").read_bytes())
        read_adapter(tmp_path / "prompt", load_config(stories260k_dir))
