"""`lit-adapter generate` and `lit-adapter chat`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch

from lit_adapter.checkpoint import load_model, tokenizer_path
from lit_adapter.errors import LitAdapterError
from lit_adapter.inference.generate import generate_tokens
from lit_adapter.tokenizer import Tokenizer

Precision = Literal["auto", "32-true", "bf16-true", "16-true"]
PRECISION_DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return PRECISION_DTYPES[precision]


def read_prompt(prompt: str) -> str:
    return sys.stdin.read() if prompt == "-" else prompt


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def generate(
    checkpoint_dir: Path,
    prompt: str = "",
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    seed: int = 1234,
    precision: Precision = "auto",
    device: str = "auto",
) -> None:
    """Generate text from a checkpoint folder; the text streams to stdout, speed and memory go to stderr.

    Args:
        checkpoint_dir: a folder written by `lit-adapter convert`.
        prompt: the prompt text; `-` reads it from stdin; empty starts from BOS alone.
        max_new_tokens: the most tokens to generate.
        temperature: sampling temperature; 0 is greedy decoding.
        top_k: sample only among the k most likely tokens.
        top_p: nucleus sampling: the smallest set of tokens whose probability reaches p.
        seed: random seed for sampling.
        precision: 32-true, bf16-true or 16-true; auto = bf16-true on a GPU that supports it, else 32-true.
        device: cpu, cuda, cuda:1, ... or auto.
    """
    dev = resolve_device(device)
    model = load_model(checkpoint_dir, device=dev, dtype=resolve_dtype(precision, dev))
    tokenizer = Tokenizer(tokenizer_path(checkpoint_dir))
    ids = torch.tensor(tokenizer.encode(read_prompt(prompt), bos=True), device=dev)
    generator = torch.Generator(device=dev).manual_seed(seed)
    stream = tokenizer.stream_decoder()
    start, count = time.perf_counter(), 0
    for token in generate_tokens(model, ids, max_new_tokens, temperature, top_k, top_p, tokenizer.eos_id,
                                 generator=generator):
        count += 1
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    elapsed = time.perf_counter() - start
    print(f"{count} tokens in {elapsed:.2f} s: {count / max(elapsed, 1e-9):.1f} tokens/s, "
          f"peak memory {peak_memory_gb(dev):.2f} GB", file=sys.stderr)


def chat(checkpoint_dir: Path) -> None:
    """Multi-turn chat (not available yet)."""
    raise LitAdapterError("chat is not implemented yet")
