"""The official ImageBind-LLM release (`7B.pth`: `{'model': state dict}`), read into our names.

- `prefix_query.weight` [n_layers, dim]: one prompt token per layer (its prompt, adapter_len 1); ImageBind-LLM adds
  the bound embedding to it on every layer (late fusion of one global token) and the prompt's value goes through the
  base `wv` only (prompt_kv_lora False): with one prompt position, gate * softmax(q k) v is tanh(gate) * wv(prompt).
- `image_bind_proj.*`, `image_bind_norm_{k}.weight`, `image_bind_f{1,2,3}_{k}.weight` (k = 1..3): the bind network,
  ours `visual.bind.proj.*` and `visual.bind.blocks.{k-1}.{norm,f1,f2,f3}.weight`.
- under `llama.`: the gates of every layer, the wq/wo/w1/w2/w3 biases, LoRA on all seven linears (no scaling),
  the norms: as in the official V2 files.
The frozen ImageBind encoder is not in the file: it comes from `encoder_weights` (`--encoder_weights`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from lit_adapter.adapters.config import LINEAR_NAMES, AdapterConfig
from lit_adapter.adapters.formats.file import AdapterFile, Tensors
from lit_adapter.adapters.formats.official import V2_RULES, Rule, _first_match, _load, _Mapper
from lit_adapter.adapters.visual import VisualConfig
from lit_adapter.config import ModelConfig

KIND = "official-imagebind-llm"
PREFIX = "prefix_query.weight"
BIND_RULES = (
    Rule(r"image_bind_proj\.(weight|bias)", r"visual.bind.proj.\1"),
    Rule(r"image_bind_(norm|f1|f2|f3)_(?P<block>\d+)\.weight", ""),  # block k -> blocks.{k-1} (see `bind_key`)
)
ENCODER_PREFIX = "image_bind."  # the encoder, in training checkpoints only


LLAMA_RULES = tuple(rule for rule in V2_RULES if not rule.target.startswith("visual."))  # V2's, less its visual


def load_state(path: Path) -> Tensors:
    """The file's state dict, memory-mapped where the format allows (a 7B.pth is read twice: detect, then read)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint (or not a checkpoint): the plain reader gives the one-line error
        return _load(path)[0]
    return data["model"] if isinstance(data, dict) and isinstance(data.get("model"), dict) else data


def is_imagebind_llm(path: Path) -> bool:
    """Whether an official .pth is an ImageBind-LLM file."""
    state = load_state(path)
    return isinstance(state, dict) and (PREFIX in state or any(str(key).startswith("image_bind_") for key in state))


def read(path: Path, base: ModelConfig, visual: Optional[VisualConfig] = None) -> AdapterFile:
    """Read an ImageBind-LLM .pth for `base`; `visual` (optional) supplies `encoder_weights`."""
    state = load_state(path)
    mapper = _Mapper(base, path)
    mapper.adapter_len = 1
    layers = prefix_prompts(state, mapper)
    for key, tensor in state.items():
        if key == PREFIX or key.startswith(ENCODER_PREFIX):
            continue
        rule, match = _first_match(BIND_RULES + LLAMA_RULES, key)
        if rule is None:
            mapper.fail(key, "unexpected in an ImageBind-LLM adapter file (a legacy-bridge 7B-beta file has "
                             "biased bind blocks, which this reader does not take)")
        if "layer" in match.groupdict():
            mapper.layer(key, match["layer"])
        if rule.gate:
            tensor = mapper.gate(key, tensor, heads=base.n_heads)
        mapper.put(bind_key(match) if "block" in match.groupdict() else match.expand(rule.target), key, tensor)
    return AdapterFile(config(state, mapper, layers, visual), mapper.tensors, path, KIND, mapper.origin)


def bind_key(match: re.Match) -> str:
    return f"visual.bind.blocks.{int(match['block']) - 1}.{match[1]}.weight"


def prefix_prompts(state: Tensors, mapper: _Mapper) -> int:
    """prefix_query [n_layers, dim] -> one prompt token for each layer; returns the number of layers."""
    if PREFIX not in state:
        mapper.fail(PREFIX, "missing: an ImageBind-LLM file holds one prompt token per layer")
    query, base = state[PREFIX], mapper.base
    if tuple(query.shape) != (base.n_layers, base.dim):
        mapper.fail(PREFIX, f"shape {list(query.shape)}, expected {[base.n_layers, base.dim]} for {base.name!r}: "
                            "the adapter is for another base model")
    for i in range(base.n_layers):
        mapper.put(f"llama.layers.{i}.attention.adaption_prompt.prompt", PREFIX, query[i: i + 1])
    return base.n_layers


def config(state: Tensors, mapper: _Mapper, layers: int, visual: Optional[VisualConfig]) -> AdapterConfig:
    """The config the file implies: its bind network's size, biases, norms and LoRA."""
    ours = mapper.tensors
    if "visual.bind.proj.weight" not in ours:
        mapper.fail("image_bind_proj.weight", "missing: the file has no bind network")
    blocks = {int(m[1]) for key in ours if (m := re.match(r"visual\.bind\.blocks\.(\d+)\.", key))}
    hidden = ours["visual.bind.blocks.0.f1.weight"].shape[0] if blocks else None
    lora = {m[1]: t.shape[0] for key, t in ours.items() if (m := re.search(r"\.(w[qkvo123])\.lora_l1$", key))}
    return AdapterConfig(
        adapter_len=1,
        adapter_layers=layers,
        gate_activation="tanh",
        bias_mode="official_7b" if any(k.startswith("llama.") and k.endswith(".bias") for k in ours) else "none",
        train_norms=any(k.startswith("llama.") and k.endswith("norm.weight") for k in ours),
        lora_rank=next(iter(lora.values()), 0),
        lora_targets=[name for name in LINEAR_NAMES if name in lora] or list(LINEAR_NAMES),
        prompt_kv_lora=False,
        fusion="late",
        visual=VisualConfig(encoder="imagebind", mode="bind", n_blocks=len(blocks), width=hidden,
                            encoder_weights=visual.encoder_weights if visual is not None else None),
    )
