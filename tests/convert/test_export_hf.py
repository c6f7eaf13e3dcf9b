"""`lit-adapter export --format hf`: a merged V2 adapter (bias/scale + trained norms, with and without LoRA) written
as a transformers folder, on stories260K and on a tiny random model of every family; transformers itself loads the
folder (its own config classes, sharded safetensors) and gives our fp32 logits within 1e-5 and our greedy text.
V1 prompts have no plain transformers form: refused in one line pointing to --format peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_adapter.adapters import AdapterConfig, build_adapter_model, load_adapter_model, save_adapter
from lit_adapter.adapters.merge import merge_linears
from lit_adapter.convert.export import export
from lit_adapter.errors import LitAdapterError
from lit_adapter.inference.engine import Decoding, Engine
from lit_adapter.inference.generate import generate_tokens
from tests.adapters.helpers import randomize
from tests.adapters.test_families import FAMILIES
from tests.helpers import family_checkpoints, run_main

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5
V2 = AdapterConfig(adapter_layers=0, bias_mode="paper", train_norms=True, prompt_style="raw")
V2_LORA = AdapterConfig(adapter_layers=0, bias_mode="paper", train_norms=True, lora_rank=2, lora_alpha=4.0,
                        prompt_style="raw")
# Qwen3's class has no MLP biases: LoRA and norms only (the paper form is refused, see below)
LORA_NORMS = AdapterConfig(adapter_layers=0, train_norms=True, lora_rank=2, lora_alpha=4.0, prompt_style="raw")
V1 = AdapterConfig.v1(adapter_layers=2, adapter_len=3, prompt_style="raw")
ARCHITECTURES = {"llama3": "LlamaForCausalLM", "mistral": "LlamaForCausalLM", "qwen2": "LlamaForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "falcon-7b": "FalconForCausalLM", "falcon-40b": "FalconForCausalLM"}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Tiny models: one torch thread."""


@pytest.fixture(scope="module")
def family_dirs(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> a checkpoint folder with random weights and the tok512 tokenizer."""
    return family_checkpoints(tmp_path_factory.mktemp("export-families"), assets, FAMILIES, seed=10)


def make_adapter(folder: Path, config: AdapterConfig, out: Path, seed: int = 1) -> Path:
    """An adapter of `config` on `folder`, every value moved away from its init."""
    model = build_adapter_model(folder, config).eval()
    randomize(model, seed=seed, scale=0.1)
    save_adapter(model, out)
    return out


def token_ids(vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 15), generator=torch.Generator().manual_seed(seed))


def our_logits(folder: Path, adapter: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the adapter model's logits, the same with its linears folded as `generate` runs it, the folded model in
    float64)."""
    model = load_adapter_model(folder, adapter)
    with torch.no_grad():
        unfolded = model(tokens)
        merge_linears(model)
        return unfolded, model(tokens), model.double()(tokens)


def hf_model(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def compare(hf_folder: Path, folder: Path, adapter: Path, label: str) -> None:
    """fp32 logits of transformers and ours within 1e-5, or within twice our own fp32 rounding (|fp32 - fp64| of
    our model) where the logits are large enough for that to exceed 1e-5; in float64 within 1e-5 (the same model)."""
    tokens = token_ids()
    unfolded, folded, exact = our_logits(folder, adapter, tokens)
    model = hf_model(hf_folder)
    with torch.no_grad():
        theirs = model(tokens).logits
        theirs64 = model.double()(tokens).logits
    diff, diff64 = float((theirs - folded).abs().max()), float((theirs64 - exact).abs().max())
    rounding = float((folded.double() - exact).abs().max())
    print(f"{label}: max |logits diff| fp32 {diff:.2e} (our own fp32 rounding {rounding:.2e}; vs unfolded "
          f"{float((theirs - unfolded).abs().max()):.2e}), fp64 {diff64:.2e}, logits up to "
          f"{float(folded.abs().max()):.1f}")
    assert folded.abs().max() > 1, "logits too flat to tell layouts apart"
    assert diff <= max(TOLERANCE, 2 * rounding) and diff64 <= TOLERANCE


@pytest.mark.parametrize("name,config", [("v2", V2), ("v2-lora", V2_LORA)])
def test_stories260k_v2_export_loads_in_transformers(name: str, config: AdapterConfig, stories260k_dir: Path,
                                                     tmp_path: Path) -> None:
    adapter = make_adapter(stories260k_dir, config, tmp_path / "adapter")
    out = export(stories260k_dir, tmp_path / "hf", adapter=adapter, format="hf", max_shard_size="300KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, with huggingface_hub's index
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"]
    assert hf_config["attention_bias"] and hf_config["mlp_bias"]  # V2's biases on all seven linears
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.model").is_file()
    compare(out, stories260k_dir, adapter, f"stories260K {name}")

    # the same greedy text: transformers' tokenizer and generate on the folder, our engine on the adapter
    prompt = "Once upon a time"
    engine = Engine.load(stories260k_dir, adapter, device="cpu", precision="32-true", prompt_style="raw")
    ours = engine.complete(engine.encode(prompt), Decoding(max_new_tokens=24)).text
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == engine.encode(prompt).tolist()
    with torch.no_grad():
        generated = hf_model(out).generate(ids, max_new_tokens=24, do_sample=False,
                                           attention_mask=torch.ones_like(ids))
    theirs = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"stories260K {name}: {ours!r}")
    assert len(ours) > 10 and theirs == ours


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_to_its_transformers_class(family: str, family_dirs, tmp_path: Path) -> None:
    config = LORA_NORMS if family == "qwen3" else V2_LORA
    adapter = make_adapter(family_dirs[family], config, tmp_path / "adapter", seed=3)
    out = export(family_dirs[family], tmp_path / "hf", adapter=adapter)
    assert json.loads((out / "config.json").read_text())["architectures"] == [ARCHITECTURES[family]]
    compare(out, family_dirs[family], adapter, family)

    # the same greedy continuation (token ids: the tokenizer is shared by no transformers model here)
    prompt = token_ids(seed=4)[0, :7]
    ours = load_adapter_model(family_dirs[family], adapter)
    merge_linears(ours)
    got = list(generate_tokens(ours.llama, prompt, 20))
    model = hf_model(out)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = model.generate(prompt[None], max_new_tokens=20, do_sample=False, pad_token_id=0,
                                  attention_mask=torch.ones(1, 7, dtype=torch.long))[0, 7:].tolist()
    assert len(expected) == 20 and got == expected


def test_a_bias_the_class_cannot_hold_is_refused(family_dirs, tmp_path: Path) -> None:
    adapter = make_adapter(family_dirs["qwen3"], V2, tmp_path / "adapter")
    with pytest.raises(LitAdapterError, match="w1, w2, w3 carry a bias here, but Qwen3ForCausalLM"):
        export(family_dirs["qwen3"], tmp_path / "hf", adapter=adapter)


def test_v1_export_is_refused_naming_the_prompts(stories260k_dir: Path, tmp_path: Path, capsys) -> None:
    adapter = make_adapter(stories260k_dir, V1, tmp_path / "v1")
    code, _, stderr = run_main(["export", "--checkpoint_dir", str(stories260k_dir), "--adapter", str(adapter),
                                "--format", "hf", "--out_dir", str(tmp_path / "hf")], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "prompts and gates of 2 layers" in stderr and "--format peft" in stderr
    assert not (tmp_path / "hf" / "config.json").exists()
