"""`lit-adapter export --format litgpt`: the base in LitGPT's checkpoint layout and the adapter as
lit_model.pth.adapter (V1) / .adapter_v2 (V2), read back through `--adapter` with the tensors exported; LitGPT's own
adapter models (litgpt 0.5, installed without its dependencies) load the folder and give our logits, and an adapter
LitGPT made loads here with LitGPT's logits; what LitGPT cannot hold is refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lit_adapter.adapters import AdapterConfig, build_adapter_model, load_adapter_model, read_adapter, save_adapter
from lit_adapter.checkpoint import load_config, save_checkpoint
from lit_adapter.config import ModelConfig
from lit_adapter.convert.export import export
from lit_adapter.errors import LitAdapterError
from tests.adapters.helpers import randomize
from tests.convert.test_export_hf import token_ids
from tests.helpers import random_state_dict

TOLERANCE = 1e-5
V1 = AdapterConfig.v1(adapter_layers=2, adapter_len=4, gate_activation="identity")
V2 = AdapterConfig.v2(adapter_len=4, adapter_layers=2)
V2_NO_PROMPTS = AdapterConfig(adapter_layers=0, bias_mode="paper", train_norms=True)
# LitGPT (0.5) computes prompt keys/values as we do with one KV head only (see `check_prompt_layout`)
MQA = ModelConfig(name="tiny-mqa", vocab_size=512, dim=64, n_layers=3, n_heads=8, n_kv_heads=1, hidden_dim=96,
                  max_seq_len=128)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Tiny models: one torch thread."""


@pytest.fixture(scope="module")
def mqa_dir(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("mqa") / "ck", random_state_dict(MQA, 3), MQA,
                           assets / "stories260K" / "tok512.model")


def make(folder: Path, config: AdapterConfig, out: Path) -> Path:
    model = build_adapter_model(folder, config).eval()
    randomize(model, seed=6, scale=0.1)
    save_adapter(model, out)
    return out


def litgpt_model(out: Path, v2: bool):
    """LitGPT's own adapter GPT built from the exported model_config.yaml, the exported base loaded."""
    import yaml

    module = pytest.importorskip("litgpt.adapter_v2" if v2 else "litgpt.adapter")
    model = module.GPT(module.Config(**yaml.safe_load((out / "model_config.yaml").read_text()))).eval()
    model.load_state_dict(torch.load(out / "lit_model.pth", weights_only=True), strict=False)
    return model, module


def litgpt_logits(out: Path, adapter_file: Path, tokens: torch.Tensor) -> torch.Tensor:
    model, _ = litgpt_model(out, adapter_file.name.endswith("_v2"))
    state = torch.load(out / "lit_model.pth", weights_only=True)
    state.update(torch.load(adapter_file, weights_only=True)["model"])
    model.load_state_dict(state)
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("name,config,file", [("v1", V1, "lit_model.pth.adapter"),
                                              ("v2", V2, "lit_model.pth.adapter_v2")])
def test_litgpt_round_trip(name: str, config: AdapterConfig, file: str, mqa_dir: Path, tmp_path: Path) -> None:
    adapter = make(mqa_dir, config, tmp_path / "adapter")
    out = export(mqa_dir, tmp_path / "litgpt", adapter=adapter, format="litgpt")
    assert {p.name for p in out.iterdir()} >= {"lit_model.pth", "model_config.yaml", "tokenizer.model", file}
    base = load_config(mqa_dir)

    # LitGPT's documented layout: fused qkv (q, k, v rows), adapter_wte [K, n_embd], gating_factor [1, 1, H, 1]
    weights = torch.load(out / "lit_model.pth", weights_only=True)
    assert weights["transformer.h.0.attn.qkv.weight"].shape == ((8 + 2 * 1) * 8, 64)
    assert {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight", "transformer.h.2.mlp.fc_2.weight"} \
        <= weights.keys()
    state = torch.load(out / file, weights_only=True)["model"]
    assert state["transformer.h.2.attn.adapter_wte.weight"].shape == (4, 64)
    assert state["transformer.h.1.attn.gating_factor"].shape == (1, 1, 8, 1)
    assert not any(re.match(r"transformer\.h\.0\.attn\.(adapter_wte|gating)", key) for key in state)

    original, back = read_adapter(adapter, base), read_adapter(out / file, base)
    assert back.kind == "litgpt" and back.config.adapter_layers == 2 and back.config.adapter_len == 4
    assert back.tensors.keys() == original.tensors.keys()
    for key, tensor in original.tensors.items():
        expected = torch.tanh(tensor) if key.endswith(".gate") and config.gate_activation == "tanh" else tensor
        assert torch.equal(back.tensors[key], expected), key  # tanh gates go out as LitGPT's raw gate
    tokens = token_ids()
    with torch.no_grad():
        ours = load_adapter_model(mqa_dir, adapter)(tokens)
        again = load_adapter_model(mqa_dir, out)(tokens)  # the folder as --adapter
    assert float((ours - again).abs().max()) <= 1e-6


@pytest.mark.parametrize("name,config,file", [("v1", V1, "lit_model.pth.adapter"),
                                              ("v2", V2, "lit_model.pth.adapter_v2"),
                                              ("v2-no-prompts", V2_NO_PROMPTS, "lit_model.pth.adapter_v2")])
def test_litgpt_itself_runs_the_export(name: str, config: AdapterConfig, file: str, mqa_dir: Path,
                                       stories260k_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("litgpt")
    folder = stories260k_dir if name == "v2-no-prompts" else mqa_dir  # stories260K: 4 KV heads, no prompts
    adapter = make(folder, config, tmp_path / "adapter")
    out = export(folder, tmp_path / "litgpt", adapter=adapter, format="litgpt")
    tokens = token_ids()
    with torch.no_grad():
        ours = load_adapter_model(folder, adapter)(tokens)
    diff = float((litgpt_logits(out, out / file, tokens) - ours).abs().max())
    print(f"LitGPT {name}: max |logits diff| {diff:.2e} (logits up to {float(ours.abs().max()):.1f})")
    assert diff <= TOLERANCE


def test_an_adapter_trained_by_litgpt_loads(mqa_dir: Path, tmp_path: Path) -> None:
    """LitGPT's own V2 adapter (its parameters moved off their init), saved as its finetune does, through --adapter."""
    out = export(mqa_dir, tmp_path / "litgpt", format="litgpt")
    (out / "model_config.yaml").write_text((out / "model_config.yaml").read_text() + "adapter_start_layer: 1\n"
                                           "adapter_prompt_length: 3\n")
    model, module = litgpt_model(out, v2=True)
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if module.adapter_filter(name, param) and not name.startswith("lm_head"):
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
        expected = model(token_ids())
    state = {k: v for k, v in model.state_dict().items() if module.adapter_filter(k, v)}
    torch.save({"model": state}, tmp_path / "lit_model.pth.adapter_v2")
    ours = load_adapter_model(mqa_dir, tmp_path / "lit_model.pth.adapter_v2")
    assert ours.adapter_config.adapter_layers == 2 and ours.adapter_config.adapter_len == 3
    with torch.no_grad():
        diff = float((ours(token_ids()) - expected).abs().max())
    print(f"LitGPT-made adapter_v2: max |logits diff| {diff:.2e}")
    assert diff <= TOLERANCE


def test_what_litgpt_cannot_hold_is_refused(stories260k_dir: Path, tmp_path: Path) -> None:
    adapter = make(stories260k_dir, AdapterConfig(adapter_layers=0, lora_rank=2), tmp_path / "lora")
    with pytest.raises(LitAdapterError, match="cannot represent LoRA"):
        export(stories260k_dir, tmp_path / "litgpt", adapter=adapter, format="litgpt")
    adapter = make(stories260k_dir, V1, tmp_path / "v1")  # stories260K has 4 KV heads
    with pytest.raises(LitAdapterError, match="4 KV heads .* no exact LitGPT form"):
        export(stories260k_dir, tmp_path / "litgpt", adapter=adapter, format="litgpt")


def test_a_litgpt_adapter_for_another_base_names_the_key(mqa_dir: Path, stories260k_dir: Path,
                                                         tmp_path: Path) -> None:
    adapter = make(mqa_dir, V2_NO_PROMPTS, tmp_path / "adapter")
    out = export(mqa_dir, tmp_path / "litgpt", adapter=adapter, format="litgpt")
    with pytest.raises(LitAdapterError) as err:
        read_adapter(out / "lit_model.pth.adapter_v2", load_config(stories260k_dir))
    print(err.value)
    assert "\n" not in str(err.value) and re.search(r"key 'transformer\.h\.0\.\S+\.adapter_bias': shape",
                                                     str(err.value))
    assert "another base model" in str(err.value)
