"""Meta consolidated checkpoints: sharded == unsharded, logits equal to the Hugging Face equivalent, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_adapter.checkpoint import WEIGHTS_FILE, load_config, load_model
from lit_adapter.config import ModelConfig
from lit_adapter.convert import convert, files
from lit_adapter.convert.meta import load_meta
from lit_adapter.errors import LitAdapterError
from tests.convert.helpers import meta_params, meta_shards, meta_state_dict_from_hf, write_meta_folder
from tests.helpers import random_state_dict, randomize_

# dim 32 with multiple_of 16 and ffn_dim_multiplier 1.3: hidden = 16 * ceil(int(1.3 * int(2 * 128 / 3)) / 16) = 112
CONFIG = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                     ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=10000.0)


def test_params_give_the_expected_architecture() -> None:
    assert CONFIG.hidden_dim == 112


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return random_state_dict(CONFIG, seed=0)


@pytest.fixture(scope="module")
def sharded(weights, tmp_path_factory) -> Path:
    return write_meta_folder(tmp_path_factory.mktemp("meta2"), weights, meta_params(CONFIG), n_shards=2)


@pytest.fixture(scope="module")
def unsharded(weights, tmp_path_factory) -> Path:
    return write_meta_folder(tmp_path_factory.mktemp("meta1"), weights, meta_params(CONFIG), n_shards=1)


def test_shards_are_cut_like_meta(sharded: Path) -> None:
    shard = torch.load(sharded / "consolidated.01.pth", weights_only=True)
    assert shard["layers.0.attention.wq.weight"].shape == (16, 32)  # dim 0 halved
    assert shard["layers.0.attention.wk.weight"].shape == (8, 32)
    assert shard["layers.0.attention.wo.weight"].shape == (32, 16)  # dim 1 halved
    assert shard["layers.0.feed_forward.w2.weight"].shape == (32, 56)
    assert shard["tok_embeddings.weight"].shape == (512, 16)
    assert shard["output.weight"].shape == (256, 32)
    assert shard["norm.weight"].shape == (32,)


def test_sharded_and_unsharded_convert_to_identical_weights(sharded, unsharded, weights, assets, tmp_path) -> None:
    tokenizer = assets / "stories260K" / "tok512.model"
    one = load_file(convert(unsharded, tmp_path / "one", tokenizer=tokenizer) / WEIGHTS_FILE)
    two = load_file(convert(sharded, tmp_path / "two", tokenizer=tokenizer) / WEIGHTS_FILE)
    assert one.keys() == two.keys() == weights.keys()
    for key in weights:
        assert torch.equal(one[key], weights[key]) and torch.equal(two[key], weights[key]), key
    config = load_config(tmp_path / "two")
    assert (config.vocab_size, config.hidden_dim, config.n_kv_heads, config.norm_eps) == (512, 112, 2, 1e-5)
    assert "rope.freqs" not in two


def test_chunked_reading_gives_the_same_weights(sharded, weights, monkeypatch) -> None:
    """With a 1-byte budget every tensor is read in its own open/close round: same result."""
    monkeypatch.setattr(files, "CHUNK_BYTES", 1)
    _, state = load_meta(sharded)
    for key in weights:
        assert torch.equal(state[key], weights[key]), key


def test_logits_match_the_hugging_face_equivalent(assets, tmp_path) -> None:
    """A LlamaForCausalLM's weights rewritten in Meta's layout (inverse q/k permutation done independently in the
    test), sharded in two, converted: our logits equal transformers' on random tokens."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        hidden_size=CONFIG.dim, intermediate_size=CONFIG.hidden_dim, num_hidden_layers=CONFIG.n_layers,
        num_attention_heads=CONFIG.n_heads, num_key_value_heads=CONFIG.n_kv_heads, vocab_size=CONFIG.vocab_size,
        rms_norm_eps=CONFIG.norm_eps, max_position_embeddings=64,
    )
    hf_model = randomize_(transformers.LlamaForCausalLM(hf_config).float().eval(), seed=1)
    meta_state = meta_state_dict_from_hf(hf_model.state_dict(), CONFIG.n_heads, CONFIG.n_kv_heads)
    folder = write_meta_folder(tmp_path / "meta", meta_state, meta_params(CONFIG), n_shards=2)
    out = convert(folder, tmp_path / "ours", tokenizer=assets / "stories260K" / "tok512.model")
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        got = load_model(out)(tokens)
    diff = float((expected - got).abs().max())
    print(f"Meta (2 shards) vs transformers: max |logits diff| {diff:.2e}")
    assert expected.abs().max() > 1 and diff <= 1e-5


def test_named_model_is_recognised(tmp_path) -> None:
    """params.json of LLaMA-2 7B as Meta ships it (no max_seq_len) -> named llama2-7b, with its 4096 context."""
    from lit_adapter.convert.meta import read_params

    path = tmp_path / "llama-2-7b" / "params.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                                "vocab_size": -1}))
    config = read_params(path, vocab_rows=32000)
    assert (config.name, config.max_seq_len, config.hidden_dim) == ("llama2-7b", 4096, 11008)


def rewrite_shard(folder: Path, rank: int, change) -> Path:
    path = folder / f"consolidated.{rank:02d}.pth"
    shard = torch.load(path, weights_only=True)
    change(shard)
    torch.save(shard, path)
    return path


def copy_folder(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_inconsistent_shards_name_file_and_key(sharded, tmp_path) -> None:
    folder = copy_folder(sharded, tmp_path / "missing")
    path = rewrite_shard(folder, 1, lambda shard: shard.pop("layers.1.feed_forward.w3.weight"))
    with pytest.raises(LitAdapterError, match=rf"{path}: weight 'layers.1.feed_forward.w3.weight' is missing"):
        load_meta(folder)

    folder = copy_folder(sharded, tmp_path / "norm")
    path = rewrite_shard(folder, 1, lambda shard: shard["layers.0.ffn_norm.weight"].add_(1))
    with pytest.raises(LitAdapterError, match=rf"{path}: replicated weight 'layers.0.ffn_norm.weight' differs"):
        load_meta(folder)

    folder = copy_folder(sharded, tmp_path / "shape")
    path = rewrite_shard(folder, 1, lambda shard: shard.update({"layers.0.attention.wv.weight": torch.zeros(9, 32)}))
    with pytest.raises(LitAdapterError, match=rf"{path}: weight 'layers.0.attention.wv.weight' has shape \[9, 32\], "
                                              r"expected \[8, 32\] \(1/2 of \[16, 32\]\)"):
        load_meta(folder)

    folder = copy_folder(sharded, tmp_path / "dtype")
    path = rewrite_shard(folder, 0, lambda shard: shard.update({"norm.weight": shard["norm.weight"].half()}))
    with pytest.raises(LitAdapterError, match=r"consolidated.01.pth: weight 'norm.weight' is torch.float32"):
        load_meta(folder)


def test_missing_and_unreadable_shards(sharded, tmp_path) -> None:
    folder = copy_folder(sharded, tmp_path / "gap")
    (folder / "consolidated.01.pth").rename(folder / "consolidated.02.pth")
    with pytest.raises(LitAdapterError, match=r"consolidated.01.pth: shard missing"):
        load_meta(folder)

    folder = copy_folder(sharded, tmp_path / "truncated")
    path = folder / "consolidated.01.pth"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(LitAdapterError, match=rf"{path}: not a readable torch checkpoint \(truncated or corrupt"):
        load_meta(folder)


def test_params_errors(sharded, tmp_path) -> None:
    folder = copy_folder(sharded, tmp_path / "params")
    (folder / "params.json").write_text("{not json")
    with pytest.raises(LitAdapterError, match=r"params.json: invalid JSON"):
        load_meta(folder)
    (folder / "params.json").write_text(json.dumps({**meta_params(CONFIG), "n_heads": "four"}))
    with pytest.raises(LitAdapterError, match=r"params.json: n_heads must be a number"):
        load_meta(folder)
    scaled = {**meta_params(CONFIG), "use_scaled_rope": True, "rope_scaling_factor": "eight"}
    (folder / "params.json").write_text(json.dumps(scaled))
    with pytest.raises(LitAdapterError, match=r"params.json: rope_scaling_factor must be a number above 1"):
        load_meta(folder)
    (folder / "params.json").write_text(json.dumps({**meta_params(CONFIG), "multiple_of": 32}))
    with pytest.raises(LitAdapterError, match=r"consolidated.00.pth: weight 'layers.0.feed_forward.w1.weight' has "
                                              r"shape \[56, 32\], expected \[64, 32\] \(1/2 of \[128, 32\]\)"):
        load_meta(folder)


def test_meta_shards_helper_round_trips(weights) -> None:
    """The test's own splitter is exact: concatenating its pieces gives back the weights."""
    shards = meta_shards(weights, 4)
    wq = torch.cat([s["layers.0.attention.wq.weight"] for s in shards], 0)
    wo = torch.cat([s["layers.0.attention.wo.weight"] for s in shards], 1)
    assert torch.equal(wq, weights["layers.0.attention.wq.weight"])
    assert torch.equal(wo, weights["layers.0.attention.wo.weight"])
