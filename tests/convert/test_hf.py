"""Hugging Face LlamaForCausalLM -> our checkpoint folder: same logits, for every storage layout, MHA and GQA."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lit_adapter.checkpoint import load_model
from lit_adapter.convert import convert, files, hf
from lit_adapter.convert.hf import hf_config_dict, load_hf, to_hf_state_dict
from tests.helpers import randomize_, run_cli

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5


def random_llama_config(kind: str, seed: int) -> transformers.LlamaConfig:
    """A random tiny LlamaConfig: `mha` (kv heads = heads), `gqa` (2 query heads per kv head) or `mqa` (1 kv head)."""
    rng = random.Random(seed)
    n_heads = rng.choice([4, 8])
    head_dim = rng.choice([4, 8])
    n_kv_heads = {"mha": n_heads, "gqa": n_heads // 2, "mqa": 1}[kind]
    return transformers.LlamaConfig(
        hidden_size=n_heads * head_dim, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        num_hidden_layers=rng.randint(1, 3), intermediate_size=rng.randint(20, 90),
        vocab_size=rng.randint(512, 600),  # the test tokenizer (tok512.model) needs at least 512 rows
        rms_norm_eps=rng.choice([1e-5, 1e-6]), rope_theta=rng.choice([10000.0, 500000.0]),
        max_position_embeddings=64, tie_word_embeddings=rng.random() < 0.5,
    )


def save_hf(model, folder: Path, layout: str) -> Path:
    """Save in one of the four layouts Hugging Face folders come in."""
    if layout == "safetensors":
        model.save_pretrained(folder)
    elif layout == "safetensors-sharded":
        model.save_pretrained(folder, max_shard_size="8KB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(model.config.to_json_string())
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        if layout == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        else:  # bin-sharded: two files and an index
            keys = list(state)
            halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
                      "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
            for name, part in halves.items():
                torch.save({k: state[k] for k in part}, folder / name)
            weight_map = {k: name for name, part in halves.items() for k in part}
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def build_hf(kind: str, seed: int):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(random_llama_config(kind, seed)).float().eval()
    return randomize_(model, seed)


def max_logit_diff(hf_model, checkpoint_dir: Path, seed: int) -> float:
    ours = load_model(checkpoint_dir)
    tokens = torch.randint(0, hf_model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        got = ours(tokens)
    assert expected.abs().max() > 1, "logits too flat to tell layouts apart"
    return float((expected - got).abs().max())


@pytest.mark.parametrize("layout", ["safetensors", "safetensors-sharded", "bin", "bin-sharded"])
@pytest.mark.parametrize("kind,seed", [("mha", 1), ("gqa", 5), ("mqa", 7)])  # 4, 8 and 8 query heads
def test_logits_match_transformers(kind: str, seed: int, layout: str, assets: Path, tmp_path: Path) -> None:
    hf_model = build_hf(kind, seed)
    source = save_hf(hf_model, tmp_path / "hf", layout)
    out = convert(source, tmp_path / "ours", tokenizer=assets / "stories260K" / "tok512.model")
    diff = max_logit_diff(hf_model, out, seed)
    print(f"{kind} {layout} ({hf_model.config.num_attention_heads} heads, "
          f"{hf_model.config.num_key_value_heads} kv heads): max |logits diff| {diff:.2e}")
    assert diff <= TOLERANCE


def test_convert_cli_on_sharded_folder(assets: Path, tmp_path: Path) -> None:
    hf_model = build_hf("gqa", 4)
    source = save_hf(hf_model, tmp_path / "hf", "safetensors-sharded")
    result = run_cli("convert", source, "--out_dir", tmp_path / "ours",
                     "--tokenizer", assets / "stories260K" / "tok512.model")
    assert result.returncode == 0, result.stderr
    assert "converted hf checkpoint" in result.stdout
    diff = max_logit_diff(hf_model, tmp_path / "ours", 4)
    print(f"CLI-converted sharded GQA: max |logits diff| {diff:.2e}")
    assert diff <= TOLERANCE


def test_layout_mistake_is_caught(assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parity check has teeth: skipping the q/k row un-permutation moves the logits far past the tolerance."""
    hf_model = build_hf("gqa", 5)
    source = save_hf(hf_model, tmp_path / "hf", "safetensors")
    monkeypatch.setattr(hf, "unpermute", lambda weight, n_heads: weight.clone())
    out = convert(source, tmp_path / "ours", tokenizer=assets / "stories260K" / "tok512.model")
    assert max_logit_diff(hf_model, out, 5) > 1e-2


@pytest.mark.parametrize("kind,seed", [("mha", 6), ("gqa", 7)])
def test_round_trip_to_hf(kind: str, seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "CHUNK_BYTES", 1)  # every tensor read in its own open/close round
    hf_model = build_hf(kind, seed)
    config, state = load_hf(save_hf(hf_model, tmp_path / "hf", "safetensors"))
    back = to_hf_state_dict(state, config)
    reference = hf_model.state_dict()
    if config.tie_embeddings:
        reference = {k: v for k, v in reference.items() if k != "lm_head.weight"}
    assert back.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(back[key], tensor), key

    rebuilt_config = transformers.LlamaConfig(**hf_config_dict(config))
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "vocab_size", "tie_word_embeddings"):
        assert getattr(rebuilt_config, name) == getattr(hf_model.config, name), name
    rebuilt = transformers.LlamaForCausalLM(rebuilt_config).float().eval()
    rebuilt.load_state_dict(back, strict=not config.tie_embeddings)
    tokens = torch.randint(0, config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.allclose(rebuilt(tokens).logits, hf_model(tokens).logits, atol=1e-6)


def test_tied_copy_of_classifier_is_ignored(tmp_path: Path) -> None:
    """Some saves of tied models store lm_head.weight anyway: it is dropped, the embedding is the classifier."""
    hf_model = build_hf("gqa", 8)
    hf_model.config.tie_word_embeddings = True
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(hf_model.config.to_json_string())
    torch.save({k: v.clone() for k, v in hf_model.state_dict().items()}, folder / "pytorch_model.bin")
    config, state = load_hf(folder)
    assert config.tie_embeddings and "output.weight" not in state


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling 'linear'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE scaling 'llama3'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"head_dim": 3}, "head_dim 3"),
])
def test_unsupported_configs_are_refused(change: dict, message: str, tmp_path: Path) -> None:
    from lit_adapter.errors import LitAdapterError

    hf_model = build_hf("mha", 9)
    folder = save_hf(hf_model, tmp_path / "hf", "safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(LitAdapterError, match="config.json") as err:
        load_hf(folder)
    assert message in str(err.value)
