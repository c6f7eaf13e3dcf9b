"""The named configs of the families (Llama 3.x, Mistral, Qwen2.5, Qwen3, Falcon) against their published config.json:
the same parameter count as transformers' own model built from that config on the meta device, and the converter
names a folder with that config.json after the named config. LLaMA's configs keep the hash their adapter files hold,
and model_config.yaml files keep loading with or without the new fields.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from lit_adapter.checkpoint import CONFIG_FILE, load_config, meta_model
from lit_adapter.config import NAMED_CONFIGS, ModelConfig
from lit_adapter.files import save_yaml

transformers = pytest.importorskip("transformers")


def llama3(hidden: int, layers: int, heads: int, ffn: int, factor: float = 8.0, **extra) -> dict:
    scaling = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": hidden,
            "intermediate_size": ffn, "num_attention_heads": heads, "num_hidden_layers": layers,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": scaling,
            "max_position_embeddings": 131072, "tie_word_embeddings": False, "vocab_size": 128256,
            "attention_bias": False, "mlp_bias": False, **extra}


def mistral(vocab: int, theta: float, window) -> dict:
    return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
            "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
            "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
            "rope_theta": theta, "sliding_window": window, "tie_word_embeddings": False, "vocab_size": vocab}


def qwen(version: int, hidden: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, context: int,
         tied: bool, **extra) -> dict:
    return {"architectures": [f"Qwen{version}ForCausalLM"], "model_type": f"qwen{version}", "hidden_act": "silu",
            "hidden_size": hidden, "intermediate_size": ffn, "max_position_embeddings": context,
            "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": tied, "use_sliding_window": False,
            "vocab_size": vocab, **extra}


def falcon(hidden: int, layers: int, heads: int, **layout) -> dict:
    return {"architectures": ["FalconForCausalLM"], "model_type": "falcon", "alibi": False, "bias": False,
            "hidden_size": hidden, "layer_norm_epsilon": 1e-5, "num_attention_heads": heads,
            "num_hidden_layers": layers, "parallel_attn": True, "vocab_size": 65024, **layout}


# the published config.json of each model (the fields that decide its shapes and numerics)
PUBLISHED = {
    "Llama-3-8B": {**llama3(4096, 32, 32, 14336), "rope_scaling": None, "max_position_embeddings": 8192},
    "Llama-3.1-8B": llama3(4096, 32, 32, 14336),
    "Llama-3.1-70B": llama3(8192, 80, 64, 28672),
    "Llama-3.2-1B": llama3(2048, 16, 32, 8192, factor=32.0, head_dim=64, tie_word_embeddings=True),
    "Llama-3.2-3B": llama3(3072, 28, 24, 8192, factor=32.0, head_dim=128, tie_word_embeddings=True),
    "Mistral-7B-v0.1": mistral(32000, 10000.0, 4096),
    "Mistral-7B": mistral(32768, 1000000.0, None),
    "Qwen2.5-0.5B": qwen(2, 896, 24, 14, 2, 4864, 151936, 32768, tied=True),
    "Qwen2.5-7B": qwen(2, 3584, 28, 28, 4, 18944, 152064, 131072, tied=False),
    "Qwen3-0.6B": qwen(3, 1024, 28, 16, 8, 3072, 151936, 40960, tied=True, head_dim=128, attention_bias=False),
    "Qwen3-8B": qwen(3, 4096, 36, 32, 8, 12288, 151936, 40960, tied=False, head_dim=128, attention_bias=False),
    "Falcon-7B": falcon(4544, 32, 71, multi_query=True, new_decoder_architecture=False),
    "Falcon-40B": falcon(8192, 60, 128, num_kv_heads=8, new_decoder_architecture=True),
    "Falcon-180B": falcon(14848, 80, 232, num_kv_heads=8, new_decoder_architecture=True),
}


def hf_folder(name: str, root: Path) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(PUBLISHED[name]))
    return folder


def test_every_family_config_has_its_published_config() -> None:
    families = {name for name in NAMED_CONFIGS if name.startswith(("Llama-", "Mistral-", "Qwen", "Falcon-"))}
    assert families == set(PUBLISHED)


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_count_equals_transformers_model(name: str, tmp_path: Path) -> None:
    hf_config = transformers.AutoConfig.from_pretrained(hf_folder(name, tmp_path))
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    expected = sum(p.numel() for p in hf_model.parameters())  # tied weights once
    got = sum(p.numel() for p in meta_model(ModelConfig.from_name(name)).parameters())
    print(f"{name}: {got:,} parameters (transformers {expected:,})")
    assert got == expected


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_converts_to_the_named_config(name: str, tmp_path: Path) -> None:
    from lit_adapter.convert.hf import read_hf_config

    converted = read_hf_config(hf_folder(name, tmp_path) / "config.json")
    assert converted.name == name
    assert converted == ModelConfig.from_name(name)  # max_seq_len included (Mistral v0.1: its sliding window)


def old_hash(config: ModelConfig) -> str:
    """architecture_hash as computed before the family fields existed (the fields of a LLaMA config then)."""
    fields = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "norm_eps", "rope_theta",
              "tie_embeddings")
    arch = {k: getattr(config, k) for k in fields}
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", ["llama-7b", "llama-65b", "llama2-70b", "stories260K", "tiny-gqa"])
def test_llama_configs_keep_their_architecture_hash(name: str) -> None:
    """Adapter files record the hash of their base: LLaMA-era ones must keep matching."""
    config = ModelConfig.from_name(name)
    assert config.architecture_hash() == old_hash(config)
    assert ModelConfig.from_name("Falcon-7B").architecture_hash() != old_hash(ModelConfig.from_name("Falcon-7B"))


def test_model_config_yaml_keeps_the_family_fields_and_old_files_load(tmp_path: Path) -> None:
    for name in ("Llama-3.1-8B", "Qwen2.5-7B", "Qwen3-8B", "Falcon-7B", "Falcon-40B"):
        folder = tmp_path / name
        folder.mkdir()
        save_yaml(ModelConfig.from_name(name).to_dict(), folder / CONFIG_FILE)
        assert load_config(folder) == ModelConfig.from_name(name)
    old = {"name": "llama-7b", "vocab_size": 32000, "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32,
           "multiple_of": 256, "ffn_dim_multiplier": None, "hidden_dim": 11008, "norm_eps": 1e-6,
           "rope_theta": 10000.0, "max_seq_len": 2048, "tie_embeddings": False}  # a model_config.yaml of before
    (tmp_path / "old").mkdir()
    save_yaml(old, tmp_path / "old" / CONFIG_FILE)
    loaded = load_config(tmp_path / "old")
    assert loaded == ModelConfig.from_name("llama-7b")
    assert (loaded.norm, loaded.mlp, loaded.linear_bias, loaded.rope_scaling) == ("rmsnorm", "swiglu", [], None)
