"""The two disjoint parameter groups of LLaMA-Adapter V2's joint training.

Image-caption data trains the visual side: the visual adapter (projection, queries, blocks) and the zero-init gates
of the early visual prompts. Instruction data trains the language side: static prompts and their gates, new_gate,
norms, bias/scale and LoRA. Under late fusion there are no early visual prompts: the visual side is the visual
adapter alone.
"""

from __future__ import annotations

import torch.nn as nn

from lit_adapter.adapters.model import AdapterModel

VISUAL_GATE_SUFFIX = ".adaption_prompt.visual_gate"


def is_visual_parameter(name: str) -> bool:
    return name.startswith("visual.") or name.endswith(VISUAL_GATE_SUFFIX)


def parameter_groups(model: AdapterModel) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """{"visual": [...], "language": [...]}: the trainable parameters, split; disjoint, union = all trainable."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"visual": [], "language": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups["visual" if is_visual_parameter(name) else "language"].append((name, param))
    return groups
