"""The real stories260K model: converted from llama2.c, greedy decoding reproduces the published text word for word."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_adapter.checkpoint import WEIGHTS_FILE, load_config, load_model
from lit_adapter.inference.generate import generate_tokens
from lit_adapter.tokenizer import Tokenizer
from tests.helpers import run_cli

STATS_LINE = re.compile(r"^(\d+) tokens in [\d.]+ s: [\d.]+ tokens/s, peak memory [\d.]+ GB$")


@pytest.fixture(scope="module")
def published(assets: Path) -> str:
    """The text published with the model, from the assets README (its indented block)."""
    readme = (assets / "README.md").read_text()
    block = readme.split("word for word (published with the model):", 1)[1].splitlines()[1:]
    lines: list[str] = []
    for line in block:
        if line.startswith("    "):
            lines.append(line[4:])
        elif lines:
            break
    text = "\n".join(lines)
    assert text.startswith("Once upon a time") and text.endswith("I can't find it.\"")
    return text


@pytest.fixture(scope="module")
def tokenizer(stories260k_dir: Path) -> Tokenizer:
    return Tokenizer(stories260k_dir / "tokenizer.model")


def test_conversion_matches_the_header(stories260k_dir: Path) -> None:
    config = load_config(stories260k_dir)
    assert (config.dim, config.hidden_dim, config.n_layers, config.n_heads, config.n_kv_heads) == (64, 172, 5, 8, 4)
    assert (config.vocab_size, config.max_seq_len, config.tie_embeddings) == (512, 512, True)
    weights = load_file(stories260k_dir / WEIGHTS_FILE)
    assert "output.weight" not in weights  # tied: stored once
    assert sum(t.numel() for t in weights.values()) == 260_032
    model = load_model(stories260k_dir)
    assert model.output.weight is model.tok_embeddings.weight


def test_greedy_tokens_equal_the_published_text(stories260k_dir: Path, tokenizer: Tokenizer, published: str) -> None:
    expected = tokenizer.encode(published, bos=False)
    assert len(expected) == 131  # the whole published text is compared, token by token
    generated = list(generate_tokens(load_model(stories260k_dir), torch.tensor([tokenizer.bos_id]), 200))
    assert generated[: len(expected)] == expected


def test_cli_generate_from_bos(stories260k_dir: Path, tokenizer: Tokenizer, published: str) -> None:
    result = run_cli("generate", "--checkpoint_dir", stories260k_dir, "--max_new_tokens", "200")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(published), result.stdout[:400]
    expected = tokenizer.encode(published, bos=False)
    assert tokenizer.encode(result.stdout, bos=False)[: len(expected)] == expected
    stats = result.stderr.strip().splitlines()[-1]
    match = STATS_LINE.match(stats)
    assert match and int(match.group(1)) == 200, result.stderr


def test_cli_prompt_from_stdin(stories260k_dir: Path, published: str) -> None:
    prompt = "Once upon a time, there was a little girl named Lily."
    result = run_cli("generate", "--checkpoint_dir", stories260k_dir, "--prompt", "-", "--max_new_tokens", "70",
                     stdin=prompt)
    assert result.returncode == 0, result.stderr
    continuation = published[len(prompt):].lstrip()  # the first streamed piece carries no leading space
    text = result.stdout.rstrip("\n")
    assert len(text) > 120 and continuation.startswith(text), result.stdout
    match = STATS_LINE.match(result.stderr.strip().splitlines()[-1])
    assert match and int(match.group(1)) == 70, result.stderr
