"""Meta's Llama 3.x folders: params.json with `use_scaled_rope`, a tiktoken `tokenizer.model`. Converted, the model's
logits equal transformers' with the llama3 RoPE scaling, the tokenizer's ids equal tiktoken's with Meta's pattern
and special tokens, and the chat template renders Meta's ChatFormat token for token."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch

from lit_adapter.checkpoint import load_config, load_model, tokenizer_path
from lit_adapter.config import ModelConfig
from lit_adapter.convert import convert
from lit_adapter.convert.meta_tokenizer import PATTERN, special_tokens
from lit_adapter.errors import LitAdapterError
from lit_adapter.prompts import get_prompt_style
from lit_adapter.tokenizer import Tokenizer
from tests.convert.helpers import meta_params, meta_state_dict_from_hf, write_meta_folder
from tests.helpers import randomize_

tiktoken = pytest.importorskip("tiktoken")
transformers = pytest.importorskip("transformers")

# byte-level merges, each buildable from two lower-ranked tokens
MERGES = [b"th", b"he", b"in", b"an", b"er", b"re", b"on", b" t", b" a", b"the", b"ing", b"and", b" the", b" and",
          b"at", b" c", b" cat", b"ha", b" h", b" hat"]
TEXTS = ["the cat and the hat are in the sea", "There, then: 123456 ?!  ", "中文 mixed ünïcödé\n\n  spaces\tand\r\n",
         "<|begin_of_text|>hi<|eot_id|> and <|start_header_id|>"]


def ranks() -> dict[bytes, int]:
    table = {bytes([b]): b for b in range(256)}
    for token in MERGES:
        table[token] = len(table)
    return table


def write_tiktoken(path: Path) -> Path:
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks().items()))
    return path


def reference_encoding():
    """tiktoken itself, set up as Meta's `Tokenizer` sets it up."""
    table = ranks()
    specials = {token: len(table) + index for index, token in enumerate(special_tokens())}
    return tiktoken.Encoding("tiny-llama3", pat_str=PATTERN, mergeable_ranks=table, special_tokens=specials), specials


@pytest.fixture(scope="module")
def llama31(tmp_path_factory) -> tuple[Path, object]:
    """A tiny Llama 3.1 in Meta's layout (from a LlamaForCausalLM with llama3 RoPE scaling), converted."""
    root = tmp_path_factory.mktemp("llama31")
    vocab = len(ranks()) + 256
    config = ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                         norm_eps=1e-5, rope_theta=500000.0)
    hf_config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=config.hidden_dim, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, rms_norm_eps=1e-5, max_position_embeddings=512,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )  # fmt: skip
    hf_model = randomize_(transformers.LlamaForCausalLM(hf_config).float().eval(), seed=3)
    state = meta_state_dict_from_hf(hf_model.state_dict(), 4, 2)
    folder = write_meta_folder(root / "Llama3.1-tiny", state, {**meta_params(config), "use_scaled_rope": True})
    write_tiktoken(folder / "tokenizer.model")
    return convert(folder, root / "ours"), hf_model


def test_logits_equal_transformers_with_the_llama3_rope_scaling(llama31) -> None:
    out, hf_model = llama31
    assert load_config(out).rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_seq_len": 8192}
    tokens = torch.randint(0, 276, (1, 300), generator=torch.Generator().manual_seed(0))
    model = load_model(out)
    with torch.no_grad():
        expected, got = hf_model(tokens).logits, model(tokens)
        model.config.rope_scaling, model._rope = None, None  # the same weights without the scaling
        unscaled = model(tokens)
    diff = float((expected - got).abs().max())
    print(f"Meta Llama 3.1 (use_scaled_rope) vs transformers: max |logits diff| {diff:.2e}")
    assert expected.abs().max() > 1 and diff <= 1e-5
    assert float((expected - unscaled).abs().max()) > 1e-3  # the scaling is what makes them equal


def test_tokenizer_ids_equal_tiktoken_with_metas_special_tokens(llama31) -> None:
    out, _ = llama31
    tokenizer = Tokenizer(tokenizer_path(out))
    encoding, specials = reference_encoding()
    for text in TEXTS:
        assert tokenizer.encode(text, bos=False) == encoding.encode(text, allowed_special="all"), text
        assert tokenizer.decode(encoding.encode(text, disallowed_special=())) == text
    assert tokenizer.bos_id == specials["<|begin_of_text|>"] and tokenizer.encode("hi")[0] == tokenizer.bos_id
    assert tokenizer.eos_id == specials["<|end_of_text|>"]
    assert set(tokenizer.stop_ids) == {specials[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}
    assert tokenizer.vocab_size == len(ranks()) + 256


def test_chat_template_renders_metas_chat_format(llama31) -> None:
    out, _ = llama31
    tokenizer = Tokenizer(tokenizer_path(out))
    encoding, specials = reference_encoding()
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": " the cat and the hat?"},
                {"role": "assistant", "content": "A hat."}, {"role": "user", "content": "And then?"}]

    def header(role: str) -> list[int]:  # Meta's ChatFormat.encode_header
        return [specials["<|start_header_id|>"], *encoding.encode(role), specials["<|end_header_id|>"],
                *encoding.encode("\n\n")]

    expected = [specials["<|begin_of_text|>"]]
    for message in messages:
        expected += [*header(message["role"]), *encoding.encode(message["content"].strip()), specials["<|eot_id|>"]]
    expected += header("assistant")
    style = get_prompt_style("chat_template").for_tokenizer(tokenizer)
    assert tokenizer.encode(style.apply_messages(messages), bos=style.adds_special_tokens) == expected


def test_a_damaged_tiktoken_file_is_one_line(tmp_path) -> None:
    from lit_adapter.convert.meta_tokenizer import is_tiktoken_file, write_hf_tokenizer

    path = tmp_path / "tokenizer.model"
    path.write_text("dGhl 0\nnot-base64!! 1\n")
    assert is_tiktoken_file(path)
    with pytest.raises(LitAdapterError, match=r"tokenizer.model: cannot read the tiktoken BPE file"):
        write_hf_tokenizer(path, tmp_path / "out")
    assert not is_tiktoken_file(Path(__file__))
