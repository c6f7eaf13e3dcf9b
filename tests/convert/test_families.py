"""Every family `lit-adapter convert` accepts, against transformers as the reference: a random tiny model of each,
made and saved by transformers, converted by the real CLI, gives the same fp32 logits (1e-5) and the same 40-token
greedy continuation as transformers' `generate`.

The families: Llama 3 with `llama3` RoPE scaling (tied and untied classifier), Mistral, Qwen2 (q/k/v biases), Qwen3
(per-head q/k norms, heads wider than dim / n_heads), Falcon in the 7B layout (multi-query, one shared LayerNorm,
parallel attention + MLP) and in the new decoder layout of 40B/180B (grouped KV, two LayerNorms; here with biases).
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from lit_adapter.checkpoint import load_config, load_model
from lit_adapter.convert.hf import load_hf
from lit_adapter.errors import LitAdapterError
from lit_adapter.inference.generate import generate_tokens
from tests.helpers import assert_cli_error, randomize_, run_cli
from tests.hf_tokenizer import CORPUS, save_tokenizer_folder, train_byte_level_bpe, transformers_tokenizer

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5
NEW_TOKENS = 40
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
# no BOS/EOS: transformers' generate must not stop early, nor suppress a token, for the continuations to compare
NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
# Llama 3.1's scaling, shrunk to a 16-wide head: wavelengths 6 and 20 are kept, 63 is blended, the rest divided
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=128)


def llama3(tied: bool) -> Any:
    return transformers.LlamaConfig(
        vocab_size=520, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=1024, rope_parameters=dict(LLAMA3_ROPE),
        tie_word_embeddings=tied, **NO_SPECIAL,
    )


def mistral() -> Any:
    return transformers.MistralConfig(
        vocab_size=530, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, sliding_window=4096,
        rope_parameters=dict(rope_type="default", rope_theta=1e6), **NO_SPECIAL,
    )


def qwen2() -> Any:
    return transformers.Qwen2Config(
        vocab_size=540, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_parameters=dict(rope_type="default", rope_theta=1e6),
        tie_word_embeddings=False, **NO_SPECIAL,
    )


def qwen3() -> Any:
    return transformers.Qwen3Config(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rope_parameters=dict(rope_type="default", rope_theta=1e6), tie_word_embeddings=True, **NO_SPECIAL,
    )


def falcon_7b() -> Any:
    return transformers.FalconConfig(
        vocab_size=515, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, multi_query=True,
        parallel_attn=True, new_decoder_architecture=False, bias=False, alibi=False, ffn_hidden_size=96,
        max_position_embeddings=256, **NO_SPECIAL,
    )


def falcon_40b() -> Any:
    return transformers.FalconConfig(
        vocab_size=525, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_kv_heads=2,
        new_decoder_architecture=True, bias=True, alibi=False, max_position_embeddings=256,
        tie_word_embeddings=False, **NO_SPECIAL,
    )


FAMILIES: dict[str, Callable[[], Any]] = {
    "llama3-tied": lambda: llama3(tied=True), "llama3-untied": lambda: llama3(tied=False), "mistral": mistral,
    "qwen2": qwen2, "qwen3": qwen3, "falcon-7b": falcon_7b, "falcon-40b": falcon_40b,
}


def build_hf(family: str, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).float().eval()
    return randomize_(model, seed)


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer.json in Llama 3's layout (BOS by its post-processor, two end tokens), trained here
    with `tokenizers` on a small corpus; its vocabulary fits every tiny model's embedding."""
    folder = tmp_path_factory.mktemp("tokenizer")
    hf = train_byte_level_bpe(CORPUS, SPECIALS, vocab_size=500, bos=SPECIALS[0])
    save_tokenizer_folder(folder, hf, bos=SPECIALS[0], eos=SPECIALS[1],
                          eos_token_ids=[hf.token_to_id(t) for t in SPECIALS[1:3]])
    return folder


@pytest.fixture(scope="module")
def converted(tokenizer_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path]]:
    """family -> (the transformers model, our checkpoint folder converted from its save by `lit-adapter convert`,
    which finds the folder's tokenizer.json)."""
    root = tmp_path_factory.mktemp("families")
    models = {family: build_hf(family, seed) for seed, family in enumerate(FAMILIES)}
    for family, model in models.items():
        model.save_pretrained(root / family / "hf")
        for file in tokenizer_folder.iterdir():
            shutil.copyfile(file, root / family / "hf" / file.name)

    def convert(family: str):
        return run_cli("convert", root / family / "hf", "--out_dir", root / family / "ours")

    with ThreadPoolExecutor(max_workers=2) as pool:  # most of a CLI run is the interpreter and torch starting up
        results = dict(zip(FAMILIES, pool.map(convert, FAMILIES), strict=True))
    for family, result in results.items():
        assert result.returncode == 0, (family, result.stderr)
        assert "converted hf checkpoint" in result.stdout, result.stdout
    return {family: (model, root / family / "ours") for family, model in models.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family: str, converted) -> None:
    hf_model, folder = converted[family]
    ours = load_model(folder)
    tokens = torch.randint(0, hf_model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf_model(tokens).logits, ours(tokens)
    assert expected.abs().max() > 1, "logits too flat to tell layouts apart"
    diff = float((expected - got).abs().max())
    print(f"{family}: max |logits diff| {diff:.2e} over {tuple(got.shape)}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_continuation_matches_transformers_generate(family: str, converted) -> None:
    """Token ids through the Python API (`generate_tokens`, KV cache): the tokenizer is tok512, shared by no
    transformers model here, so the comparison is of ids."""
    hf_model, folder = converted[family]
    ours = load_model(folder)
    prompt = torch.randint(0, hf_model.config.vocab_size, (7,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf_model.generate(prompt[None], max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                     pad_token_id=0, attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long))
    expected = expected[0, prompt.numel():].tolist()
    got = list(generate_tokens(ours, prompt, NEW_TOKENS))
    print(f"{family}: {NEW_TOKENS} greedy tokens, {len(set(got))} distinct, first {got[:8]}")
    assert len(expected) == NEW_TOKENS and got == expected


def test_generate_cli_prints_the_text_of_transformers_generate(converted, tokenizer_folder: Path) -> None:
    """`lit-adapter generate` (greedy, raw prompt, stopping on the tokenizer's end ids) against transformers'
    `generate` with the same stop ids, its ids decoded by transformers' own tokenizer of the same tokenizer.json."""
    reference = transformers_tokenizer(tokenizer_folder)
    stop_ids = [reference.convert_tokens_to_ids(t) for t in SPECIALS[1:3]]
    prompt = "Once upon a time"

    def generate(family: str):
        return run_cli("generate", "--checkpoint_dir", converted[family][1], "--prompt", prompt, "--prompt_style",
                       "raw", "--temperature", "0", "--max_new_tokens", str(NEW_TOKENS), "--json")

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(FAMILIES, pool.map(generate, FAMILIES), strict=True))
    for family, result in results.items():
        assert result.returncode == 0, (family, result.stderr)
        record = json.loads(result.stdout.strip().splitlines()[-1])
        ids = reference(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = converted[family][0].generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                                eos_token_id=stop_ids, pad_token_id=stop_ids[0],
                                                attention_mask=torch.ones_like(ids))
        new = out[0, ids.shape[1]:].tolist()
        new = new[:-1] if new and new[-1] in stop_ids else new
        expected = reference.decode(new)
        print(f"{family}: {record['new_tokens']} tokens ({record['finish']}): {record['text'][:40]!r}")
        assert record["prompt_tokens"] == ids.shape[1] and record["new_tokens"] == len(new), (family, record)
        assert record["text"] == expected, (family, record["text"], expected)


def test_configs_carry_the_family_fields(converted) -> None:
    """What each config.json became (and model_config.yaml keeps): the family's variants, one field each."""
    configs = {family: load_config(folder) for family, (_, folder) in converted.items()}
    assert configs["llama3-tied"].tie_embeddings and not configs["llama3-untied"].tie_embeddings
    assert configs["llama3-tied"].rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_seq_len": 128}
    assert configs["mistral"].rope_theta == 1e6 and configs["mistral"].max_seq_len == 256
    assert configs["qwen2"].linear_bias == ["wq", "wk", "wv"] and not configs["qwen2"].qk_norm
    assert configs["qwen3"].qk_norm and configs["qwen3"].head_dim == 16 and configs["qwen3"].dim == 32
    falcon7, falcon40 = configs["falcon-7b"], configs["falcon-40b"]
    assert (falcon7.norm, falcon7.mlp, falcon7.n_kv_heads, falcon7.shared_norm) == ("layernorm", "gelu", 1, True)
    assert falcon7.parallel_residual and falcon40.parallel_residual and not falcon40.shared_norm
    assert falcon40.n_kv_heads == 2 and falcon40.linear_bias == ["wq", "wk", "wv", "wo", "w1", "w2"]


def test_fused_qkv_split_has_teeth(converted, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading Falcon's fused query_key_value as if it were laid out q | k | v (wrong for grouped KV) moves the
    logits far past the tolerance: the parity above checks the per-group layout."""
    from lit_adapter.convert import hf

    def flat_split(tensor: torch.Tensor, config) -> tuple[torch.Tensor, ...]:
        q_rows, kv_rows = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        return tuple(tensor.split([q_rows, kv_rows, kv_rows]))

    hf_model, folder = converted["falcon-40b"]
    monkeypatch.setattr(hf, "split_fused_qkv", flat_split)
    config, state = load_hf(folder.parent / "hf")
    ours = load_model(folder)
    ours.load_state_dict(state)  # (untied: the state holds every weight)
    tokens = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf_model(tokens).logits - ours(tokens)).abs().max() > 1e-2


UNSUPPORTED = {
    "alibi": ("falcon-7b", {"alibi": True}, "ALiBi"),
    "sliding-window": ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    "yarn": ("llama3-untied", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn'"),
    "gpt2": ("mistral", {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "model_type 'gpt2'"),
}


def changed_folder(converted, case: str, root: Path) -> Path:
    """The family's HF folder with config.json changed as `case` says (weights linked, not copied)."""
    family, change, _ = UNSUPPORTED[case]
    source = converted[family][1].parent / "hf"
    folder = root / case
    folder.mkdir(parents=True)
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    (folder / "model.safetensors").symlink_to(source / "model.safetensors")
    return folder


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_variants_are_refused_in_one_line(case: str, converted, tmp_path: Path) -> None:
    folder = changed_folder(converted, case, tmp_path)
    with pytest.raises(LitAdapterError) as err:
        load_hf(folder)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(folder / "config.json")), message
    assert UNSUPPORTED[case][2] in message, message


def test_cli_refuses_alibi_falcon_and_other_architectures(converted, assets: Path, tmp_path: Path) -> None:
    cases = ["alibi", "gpt2"]
    folders = [changed_folder(converted, case, tmp_path / "in") for case in cases]

    def convert(folder: Path):
        return run_cli("convert", folder, "--out_dir", tmp_path / "out" / folder.name, "--tokenizer",
                       assets / "stories260K" / "tok512.model")

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(convert, folders))
    for case, folder, result in zip(cases, folders, results, strict=True):
        line = assert_cli_error(result, str(folder / "config.json"), UNSUPPORTED[case][2])
        print(f"{case}: {line}")
