"""Token sampling and KV-cache decoding."""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from lit_adapter.errors import LitAdapterError
from lit_adapter.model import LLaMA


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next token ids [B] from logits [B, vocab]; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
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
    model: LLaMA,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    eos_id: Optional[int] = None,
    prefix_input: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Iterator[int]:
    """Yield new token ids one at a time for a 1-D prompt, stopping at EOS (not yielded) or max_new_tokens."""
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
            logits = model(tokens, input_pos=input_pos, prefix_input=prefix_input)[:, -1]
            next_token = sample(logits, temperature, top_k, top_p, generator)
            token = int(next_token)
            if eos_id is not None and token == eos_id:
                return
            yield token
            tokens = next_token[None]
            input_pos = input_pos[-1:] + 1
    finally:
        model.clear_kv_cache()
