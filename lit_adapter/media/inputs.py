"""Weighted inputs of any modality for an ImageBind-LLM adapter: `--image a.jpg:0.5 --audio b.wav:0.5`.

Each input is read and preprocessed (`lit_adapter.media.load`), embedded by the adapter's ImageBind encoder,
normalised and mixed by its weight (`encoders.joint.mix`), then turned into the one visual token by the bind
network (`VisualAdapter`, mode bind).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

from lit_adapter.encoders.joint import CacheSettings
from lit_adapter.errors import LitAdapterError
from lit_adapter.media import INPUT_KINDS, load, modality_of


@dataclasses.dataclass(frozen=True)
class WeightedInput:
    kind: str
    path: Path
    weight: float = 1.0


def parse_input(kind: str, spec: Union[str, Path]) -> WeightedInput:
    """`PATH` or `PATH:WEIGHT` (weight default 1; a path that itself contains ':' needs the weight spelled out)."""
    text = str(spec)
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            return WeightedInput(kind, Path(text))
        if value < 0:
            raise LitAdapterError(f"--{kind} {text}: the weight must be >= 0, got {value}")
        return WeightedInput(kind, Path(path), value)
    return WeightedInput(kind, Path(text))


def parse_inputs(specs: Mapping[str, Optional[Union[str, Path]]]) -> list[WeightedInput]:
    """{kind: spec or None} (the command-line flags) -> the given inputs, in `INPUT_KINDS` order."""
    unknown = sorted(set(specs) - set(INPUT_KINDS))
    if unknown:
        raise LitAdapterError(f"unknown input kinds {unknown}; choose among {list(INPUT_KINDS)}")
    return [parse_input(kind, specs[kind]) for kind in INPUT_KINDS if specs.get(kind) is not None]


def read_inputs(inputs: Sequence[WeightedInput], device: torch.device) -> list[tuple[str, torch.Tensor, float]]:
    """[(modality, batch of one [1, ...], weight)] for the visual adapter."""
    if inputs and sum(i.weight for i in inputs) <= 0:
        raise LitAdapterError("the input weights sum to 0; give at least one input a positive weight")
    return [(modality_of(i.kind), load(i.kind, i.path)[None].to(device), i.weight) for i in inputs]


NEEDS_BIND = "needs an ImageBind-LLM adapter (--adapter 7B.pth, or one trained with encoder imagebind)"


def bind_visual(adapter_model, what: str):
    """The bind-mode visual adapter of `adapter_model` (None or any model); else `what` (the input or option that
    asked for it) is refused in one line."""
    visual = getattr(adapter_model, "visual", None)
    if visual is None or visual.config.mode != "bind":
        raise LitAdapterError(f"{what}: {NEEDS_BIND}")
    return visual


def bind_tokens(adapter_model, specs: Mapping[str, Optional[Union[str, Path]]],
                device: torch.device) -> Optional[torch.Tensor]:
    """ImageBind-LLM's visual token [1, 1, dim] for the weighted inputs `specs` ({kind: PATH[:WEIGHT] or None});
    None when no input is given."""
    inputs = parse_inputs(specs)
    if not inputs:
        return None
    with torch.inference_mode():
        return adapter_model.encode_images(read_inputs(inputs, device))


def prepare_bind(visual, encoder_weights: Optional[Path] = None, cache_index: Optional[Path] = None,
                 cache: Optional[CacheSettings] = None) -> None:
    """Attach the ImageBind encoder from `encoder_weights` and the retrieval cache (`cache`: its settings, the
    official ones by default) to a bind-mode visual adapter."""
    from lit_adapter.encoders.imagebind import load_imagebind
    from lit_adapter.encoders.joint import load_cache

    device = visual.bind.proj.weight.device
    if encoder_weights is not None:
        visual.attach_encoder(load_imagebind(encoder_weights, device=device))
    if cache_index is not None:
        visual.cache = (load_cache(cache_index), cache or CacheSettings())
