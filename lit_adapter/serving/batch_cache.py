"""The KV cache of continuous batching: rows side by side on one column axis, each left-padded, that requests join
(prefilled into free rows, right-aligned on the current width) and leave (the last row moves into the freed place)
at step boundaries; see `lit_adapter.serving.scheduler` for the design."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from lit_adapter.inference.cpu import decode_step
from lit_adapter.inference.generate import left_pad, padded_mask, row_positions
from lit_adapter.model import KVCache, LLaMA

CHUNK = 64  # columns the cache grows by at least


class _CacheView(KVCache):
    """A layer's cache over rows [start, stop) of the shared storage (writes go into the storage)."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v, self.prompt_kv = k, v, None


class BatchCache:
    """The rows in flight in one left-padded KV cache of `llama` (see the module docstring).

    `owners[i]` is what row i belongs to; `pads[i]` how many columns before row i's first token.
    """

    def __init__(self, llama: LLaMA, max_rows: int) -> None:
        self.llama = llama
        self.max_rows = max_rows
        self.context = llama.config.max_seq_len
        self.device, self.dtype = llama.output.weight.device, llama.output.weight.dtype
        self.storage: list[tuple[Tensor, Tensor]] = []
        self.capacity = 0
        self.width = 0  # the next column a step writes
        self.pads = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        self.owners: list[Any] = []
        self.visual: list[Optional[Tensor]] = []
        self._views: Optional[list[KVCache]] = None  # the caches of all rows (kept: they hold the prompt keys)
        self._visual_batch: Optional[Tensor] = None
        self.moves = {"right": 0, "left": 0, "grown": 0}  # how often the rows were shifted and the storage grew

    @property
    def rows(self) -> int:
        return len(self.owners)

    def add(self, owners: Sequence[Any], prompts: Sequence[Tensor], visual: Sequence[Optional[Tensor]]) -> Tensor:
        """Prefill `prompts` (1-D, each shorter than the context) into new rows; their last logits [n, vocab]."""
        start, count, wide = self.rows, len(prompts), max(p.numel() for p in prompts)
        if start + count > self.max_rows:
            raise ValueError(f"{start + count} rows exceed the batch of {self.max_rows}")
        if start == 0:
            self.width = 0
        if max(self.width, wide) + 1 > self.capacity:
            self._compact()
            self._grow(max(self.width, wide) + 1)
        if wide > self.width:
            self._shift(wide - self.width)
        tokens, pads = left_pad(prompts)
        pads = pads + (self.width - wide)
        slots = torch.arange(self.width - wide, self.width, device=self.device)
        caches = [_CacheView(k[start:start + count], v[start:start + count]) for k, v in self.storage]
        visual_tokens = _stack_visual(visual)
        self.llama.kv_caches = caches
        try:
            with decode_step(tokens):
                logits = self.llama(tokens, input_pos=slots, visual_tokens=visual_tokens,
                                    mask=padded_mask(pads, slots, self.width),
                                    positions=row_positions(pads, slots), last_only=True)[:, -1]
        finally:
            self.llama.clear_kv_cache()
        self.pads[start:start + count] = pads
        self.owners += list(owners)
        self.visual += list(visual)
        self._changed()
        return logits

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per row (tokens [rows]); the next logits [rows, vocab]."""
        if self.width + 1 > self.capacity:
            self._compact()
            self._grow(self.width + 1)
        rows = self.rows
        slots = torch.tensor([self.width], device=self.device)
        pads = self.pads[:rows]
        if self._views is None:
            self._views = [_CacheView(k[:rows], v[:rows]) for k, v in self.storage]
            self._visual_batch = _stack_visual(self.visual)
        self.llama.kv_caches = self._views
        try:
            with decode_step(tokens[:, None]):
                logits = self.llama(tokens[:, None], input_pos=slots, visual_tokens=self._visual_batch,
                                    mask=padded_mask(pads, slots, self.width + 1),
                                    positions=row_positions(pads, slots), last_only=True)[:, -1]
        finally:
            self.llama.clear_kv_cache()
        self.width += 1
        return logits

    def remove(self, owner: Any) -> None:
        """Drop `owner`'s row: the last row moves into its place."""
        row, last = self.owners.index(owner), self.rows - 1
        if row != last:
            for k, v in self.storage:
                k[row, :, : self.width] = k[last, :, : self.width]
                v[row, :, : self.width] = v[last, :, : self.width]
            self.pads[row] = self.pads[last]
            self.owners[row], self.visual[row] = self.owners[last], self.visual[last]
        self.owners.pop()
        self.visual.pop()
        if not self.owners:
            self.width = 0
        self._changed()

    def clear(self) -> None:
        self.owners, self.visual, self.width = [], [], 0
        self._changed()

    def _changed(self) -> None:
        self._views, self._visual_batch = None, None

    def _compact(self) -> None:
        """Drop the columns that every row pads."""
        shared = int(self.pads[: self.rows].min()) if self.rows else self.width
        if shared:
            self._shift(-shared)

    def _grow(self, columns: int) -> None:
        """Room for `columns` columns (storage only grows, up to the model's context)."""
        if columns <= self.capacity:
            return
        capacity = min(self.context, max(columns, self.capacity + CHUNK, 2 * self.capacity))
        if columns > capacity:
            raise ValueError(f"{columns} columns exceed the model's context of {self.context}")
        c = self.llama.config
        shape = (self.max_rows, c.n_kv_heads, capacity, c.head_dim)
        storage = []
        for k, v in self.storage or [(None, None)] * c.n_layers:
            new_k = torch.zeros(shape, device=self.device, dtype=self.dtype)
            new_v = torch.zeros(shape, device=self.device, dtype=self.dtype)
            if k is not None:
                new_k[:, :, : self.width] = k[:, :, : self.width]
                new_v[:, :, : self.width] = v[:, :, : self.width]
            storage.append((new_k, new_v))
        self.storage, self.capacity = storage, capacity
        self.moves["grown"] += 1
        self._changed()

    def _shift(self, columns: int) -> None:
        """Move every row `columns` to the right (positive: more padding) or left (negative: less)."""
        rows, width = self.rows, self.width
        if rows:
            for k, v in self.storage:
                for tensor in (k, v):
                    if columns > 0:
                        tensor[:rows, :, columns: width + columns] = tensor[:rows, :, :width].clone()
                    else:
                        tensor[:rows, :, : width + columns] = tensor[:rows, :, -columns:width].clone()
            self.pads[:rows] += columns
            self.moves["right" if columns > 0 else "left"] += 1
        self.width = width + columns
        self._changed()


def _stack_visual(visual: Sequence[Optional[Tensor]]) -> Optional[Tensor]:
    """Visual tokens [rows, tokens, dim] with all-zero rows (no image, see `GatedPrompt`), or None without any."""
    present = [v for v in visual if v is not None]
    if not present:
        return None
    zeros = torch.zeros_like(present[0])
    return torch.cat([v if v is not None else zeros for v in visual])
