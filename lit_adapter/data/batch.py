"""What a training or validation batch holds, and which training data source it comes from."""

from __future__ import annotations

from typing import TypedDict

import torch
from typing_extensions import NotRequired

# the label of a position that carries no loss (torch's cross_entropy default)
IGNORE_INDEX = -100

# the training data sources: instruction-following data (text, or with images as ScienceQA) and image captions;
# joint training routes each source's optimizer steps to its own parameter group
INSTRUCTION, CAPTION = "instruction", "caption"
SOURCES = (INSTRUCTION, CAPTION)


class TrainingBatch(TypedDict):
    """A padded batch of B samples of one source (the collate functions make it; a dict at run time).

    input_ids: [B, T] token ids, right-padded with 0
    labels: [B, T] the supervised ids, IGNORE_INDEX elsewhere (aligned with input_ids: the model shifts)
    attention_mask: [B, T] 1 on real tokens, 0 on padding
    images: [B, 3, S, S] transformed images; absent for text-only data
    has_image: [B] bool, which rows have a real image (ScienceQA: zeros stand in for the rest); absent when every
        row has one (captions) or none does
    source: INSTRUCTION or CAPTION
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    images: NotRequired[torch.Tensor]
    has_image: NotRequired[torch.Tensor]
    source: str
