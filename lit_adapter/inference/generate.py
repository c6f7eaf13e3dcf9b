"""Token sampling and KV-cache decoding, one prompt at a time or a left-padded batch.

Decoding runs with torch's settings as they are; inside an entered `lit_adapter.inference.cpu.CPUDecoding`, each
forward pass takes that context's per-step settings (`decode_step`).
"""

from __future__ import annotations

from typing import Callable, Collection, Iterator, Optional, Sequence, Union

import torch

from lit_adapter.errors import LitAdapterError
from lit_adapter.inference.cpu import decode_step
from lit_adapter.model import LLaMA

# the token id(s) that end a generation (Llama 3 Instruct has two: <|eot_id|> and <|end_of_text|>)
StopIds = Union[int, Collection[int], None]


def stop_set(eos_id: StopIds) -> frozenset[int]:
    return frozenset() if eos_id is None else frozenset([eos_id] if isinstance(eos_id, int) else eos_id)


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next token ids [B] from logits [B, vocab]; temperature 0 means greedy."""
    logits = logits.float()  # one row per sequence: cheap, and argmax/softmax over bf16 are slow on CPU
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest set whose mass reaches top_p (the most likely token is always kept)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_tokens(
    model: LLaMA, prompt: torch.Tensor, max_new_tokens: int,
    temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0, eos_id: StopIds = None,
    visual_tokens: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
) -> Iterator[int]:
    """Yield new token ids one at a time for a 1-D prompt, stopping at EOS (any of `eos_id`; not yielded) or
    max_new_tokens."""
    stops = stop_set(eos_id)
    if prompt.ndim != 1 or prompt.numel() == 0:
        raise ValueError("prompt must be a non-empty 1-D tensor of token ids")
    max_len = model.config.max_seq_len
    if prompt.numel() >= max_len:
        raise LitAdapterError(
            f"prompt is {prompt.numel()} tokens, the model's context is {max_len}: shorten the prompt"
        )
    max_new_tokens = min(max_new_tokens, max_len - prompt.numel())
    model.set_kv_cache(1, prompt.numel() + max_new_tokens, device=prompt.device)
    try:
        input_pos = torch.arange(prompt.numel(), device=prompt.device)
        tokens = prompt[None]
        for _ in range(max_new_tokens):
            with decode_step(tokens):
                logits = model(tokens, input_pos=input_pos, visual_tokens=visual_tokens, last_only=True)[:, -1]
            next_token = sample(logits, temperature, top_k, top_p, generator)
            token = int(next_token)
            if token in stops:
                return
            yield token
            tokens = next_token[None]
            input_pos = input_pos[-1:] + 1
    finally:
        model.clear_kv_cache()


def left_pad(prompts: Sequence[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D prompts into [B, T] aligned on the right; returns (tokens, pad counts [B])."""
    width = max(p.numel() for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=prompts[0].device)
    for row, prompt in enumerate(prompts):
        tokens[row, width - prompt.numel():] = prompt
    pads = torch.tensor([width - p.numel() for p in prompts], device=prompts[0].device)
    return tokens, pads


def padded_mask(pads: torch.Tensor, slots: torch.Tensor, key_len: int) -> torch.Tensor:
    """Boolean [B, 1, T, key_len] for queries in cache `slots` [T]: causal, padding columns hidden.

    A padding query attends to itself alone, so its (unused) hidden state stays finite: a fully masked row would
    give NaN, and NaN values in the cache poison the real rows even behind a zero attention weight.
    """
    keys = torch.arange(key_len, device=slots.device)
    causal = keys[None, :] <= slots[:, None]
    real = keys[None, :] >= pads[:, None]
    itself = keys[None, :] == slots[:, None]
    return ((causal[None] & real[:, None]) | itself[None])[:, None]


def row_positions(pads: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rotary positions [B, T]: row b's first real token (slot pads[b]) is position 0, as if it were alone."""
    return (slots[None, :] - pads[:, None]).clamp(min=0)


@torch.inference_mode()
def generate_batch(
    model: LLaMA, prompts: Sequence[torch.Tensor], max_new_tokens: int,
    temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0, eos_id: StopIds = None,
    visual_tokens: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
    should_stop: Optional[Callable[[int, list[int]], bool]] = None,
) -> list[list[int]]:
    """New token ids for each 1-D prompt, decoded together: left padding, a padding mask, per-row positions.

    A row ends at EOS (not included), at max_new_tokens, or when `should_stop(row, tokens)` says so; greedy results
    equal those of `generate_tokens` one prompt at a time. `visual_tokens` has one row per prompt (or one, shared).
    """
    if not prompts or any(p.ndim != 1 or p.numel() == 0 for p in prompts):
        raise ValueError("prompts must be non-empty 1-D tensors of token ids")
    stops = stop_set(eos_id)
    tokens, pads = left_pad(prompts)
    batch, width = tokens.shape
    max_len = model.config.max_seq_len
    if width >= max_len:
        raise LitAdapterError(f"a prompt is {width} tokens, the model's context is {max_len}: shorten the prompt")
    max_new_tokens = min(max_new_tokens, max_len - width)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    model.set_kv_cache(batch, width + max_new_tokens, device=tokens.device)
    try:
        slots = torch.arange(width, device=tokens.device)
        for _ in range(max_new_tokens):
            mask = padded_mask(pads, slots, int(slots[-1]) + 1)
            with decode_step(tokens):
                logits = model(tokens, input_pos=slots, visual_tokens=visual_tokens, mask=mask,
                               positions=row_positions(pads, slots), last_only=True)
            next_tokens = sample(logits[:, -1], temperature, top_k, top_p, generator)
            for row, token in enumerate(next_tokens.tolist()):
                if done[row]:
                    continue
                if token in stops:
                    done[row] = True
                    continue
                outputs[row].append(token)
                done[row] = should_stop is not None and should_stop(row, outputs[row])
            if all(done):
                break
            tokens = next_tokens[:, None]
            slots = slots[-1:] + 1
    finally:
        model.clear_kv_cache()
    return outputs
