"""LitGPT's adapter checkpoints (`lit_model.pth.adapter`, `lit_model.pth.adapter_v2`: `{"model": state}`), read
into our names (the layout: `lit_adapter/convert/litgpt.py`).

- adapter (V1): `transformer.h.{i}.attn.adapter_wte.weight` [K, n_embd] and `attn.gating_factor` [1, 1, n_head, 1]
  (older files [1, n_head, 1, 1]) from `adapter_start_layer` on: our prompts with raw per-head gates
  (gate_activation identity).
- adapter_v2: also `adapter_bias` / `adapter_scale` of `attn.qkv` (split into wq, wk, wv, q/k rows back in our
  order), `attn.proj`, `mlp.fc_1/fc_2/proj` (bias_mode paper) and the norms (train_norms). Its `lm_head` adapter
  has no counterpart here: it must be at its initial values (bias 0, scale 1).
Prompts load for models with one KV head, where LitGPT computes them as we do (`convert.litgpt.check_prompt_layout`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from lit_adapter.adapters.config import AdapterConfig
from lit_adapter.adapters.formats.file import AdapterFile, Tensors
from lit_adapter.config import ModelConfig
from lit_adapter.errors import LitAdapterError, torch_load_problem

KIND = "litgpt"
SUFFIXES = (".adapter", ".adapter_v2")
LAYER_KEY = re.compile(r"transformer\.h\.(\d+)\.(.+)")
OURS = {"attn.proj": "attention.wo", "mlp.fc_1": "feed_forward.w1", "mlp.fc_2": "feed_forward.w3",
        "mlp.proj": "feed_forward.w2"}
NORMS = {"norm_1": "attention_norm", "norm_2": "ffn_norm"}
LINEAR_PART = re.compile(r"\.w[qkvo123]\.(bias|scale)$")


def adapter_checkpoint(path: Path) -> Optional[Path]:
    """The LitGPT adapter file `path` is (or its folder holds), else None."""
    if path.is_file():
        return path if path.name.endswith(SUFFIXES) else None
    from lit_adapter.convert.litgpt import V1_FILE, V2_FILE

    for name in (V2_FILE, V1_FILE):
        if (path / name).is_file():
            return path / name
    return None


def fail(path: Path, key: str, why: str) -> None:
    raise LitAdapterError(f"{path}: key {key!r}: {why}")


def read(path: Path, base: ModelConfig) -> AdapterFile:
    """A LitGPT adapter / adapter_v2 checkpoint for the base model `base`."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike mean "not a readable checkpoint"
        raise LitAdapterError(f"{path}: {torch_load_problem(err)}") from None
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LitAdapterError(f"{path}: expected LitGPT's {{'model': state dict}}")
    reader = _Reader(path, base)
    for key, tensor in state.items():
        reader.take(key, tensor)
    return reader.finish(v2=path.name.endswith(".adapter_v2") or reader.v2)


class _Reader:
    def __init__(self, path: Path, base: ModelConfig) -> None:
        self.path, self.base = path, base
        self.tensors: Tensors = {}
        self.origin: dict[str, str] = {}
        self.prompt_layers: dict[int, int] = {}  # layer -> K
        self.v2 = False

    def put(self, ours: str, key: str, tensor: torch.Tensor) -> None:
        self.tensors[ours], self.origin[ours] = tensor, key

    def shape(self, key: str, tensor: torch.Tensor, want: tuple[int, ...]) -> None:
        if tuple(tensor.shape) != want:
            fail(self.path, key, f"shape {list(tensor.shape)}, expected {list(want)} for {self.base.name!r}: the "
                                 "adapter is for another base model")

    def take(self, key: str, tensor: torch.Tensor) -> None:
        base = self.base
        if key in ("lm_head.adapter_bias", "lm_head.adapter_scale"):
            initial = 0.0 if key.endswith("bias") else 1.0
            if not bool(tensor.eq(initial).all()):
                fail(self.path, key, "trained; an adapter on the classifier has no counterpart here")
            self.v2 = True
            return
        if key in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
            self.shape(key, tensor, (base.dim,))
            self.put(f"llama.norm.{key.rsplit('.', 1)[-1]}", key, tensor)
            self.v2 = True
            return
        match = LAYER_KEY.fullmatch(key)
        if match is None:
            fail(self.path, key, "unexpected in a LitGPT adapter checkpoint")
        layer, rest = int(match[1]), match[2]
        if layer >= base.n_layers:
            fail(self.path, key, f"layer {layer} does not exist in {base.name!r} ({base.n_layers} layers): the "
                                 "adapter is for another base model")
        stem = f"llama.layers.{layer}"
        seam = f"{stem}.attention.adaption_prompt"
        if rest == "attn.adapter_wte.weight":
            if tensor.ndim != 2 or tensor.shape[1] != base.dim:
                fail(self.path, key, f"shape {list(tensor.shape)}, expected [K, {base.dim}] for {base.name!r}: the "
                                     "adapter is for another base model")
            self.prompt_layers[layer] = tensor.shape[0]
            self.put(f"{seam}.prompt", key, tensor)
        elif rest == "attn.gating_factor":
            heads = base.n_heads
            if tuple(tensor.shape) == (1, 1, heads, 1):
                tensor = tensor.permute(0, 2, 1, 3)
            self.shape(key, tensor, (1, heads, 1, 1))
            self.put(f"{seam}.gate", key, tensor.contiguous())
        elif rest.startswith("attn.qkv.adapter_"):
            self.linear_qkv(key, rest.rsplit(".", 1)[-1], tensor, stem)
        elif rest.rsplit(".", 1)[0] in OURS and rest.rsplit(".", 1)[-1] in ("adapter_bias", "adapter_scale"):
            module, part = rest.rsplit(".", 1)
            ours = f"{stem}.{OURS[module]}"
            rows = self.rows(OURS[module].rsplit(".", 1)[-1])
            self.shape(key, tensor, (rows,))
            self.put(f"{ours}.{'bias' if part == 'adapter_bias' else 'scale'}", key, tensor)
            self.v2 = True
        elif rest.split(".")[0] in NORMS and rest.split(".")[-1] in ("weight", "bias"):
            self.shape(key, tensor, (base.dim,))
            self.put(f"{stem}.{NORMS[rest.split('.')[0]]}.{rest.split('.')[-1]}", key, tensor)
            self.v2 = True
        else:
            fail(self.path, key, "unexpected in a LitGPT adapter checkpoint")

    def rows(self, name: str) -> int:
        base = self.base
        return {"wq": base.n_heads * base.head_dim, "wk": base.n_kv_heads * base.head_dim,
                "wv": base.n_kv_heads * base.head_dim, "wo": base.dim, "w1": base.hidden_dim, "w3": base.hidden_dim,
                "w2": base.dim}[name]

    def linear_qkv(self, key: str, part: str, tensor: torch.Tensor, stem: str) -> None:
        from lit_adapter.convert.litgpt import split

        self.shape(key, tensor, (self.rows("wq") + 2 * self.rows("wk"),))
        for name, rows in split(tensor, self.base).items():
            self.put(f"{stem}.attention.{name}.{'bias' if part == 'adapter_bias' else 'scale'}", key, rows)
        self.v2 = True

    def finish(self, v2: bool) -> AdapterFile:
        base, path = self.base, self.path
        layers = sorted(self.prompt_layers)
        lengths = set(self.prompt_layers.values())
        if len(lengths) > 1:
            raise LitAdapterError(f"{path}: the layers' adapter_wte have different lengths {sorted(lengths)}")
        if layers:
            from lit_adapter.convert.litgpt import check_prompt_layout

            check_prompt_layout(base, path)
        if layers and layers != list(range(layers[0], base.n_layers)):
            raise LitAdapterError(f"{path}: adapter_wte on layers {layers}; LitGPT adapts every layer from "
                                  "adapter_start_layer on")
        for layer in layers:
            if f"llama.layers.{layer}.attention.adaption_prompt.gate" not in self.tensors:
                fail(path, f"transformer.h.{layer}.attn.gating_factor", "missing beside its adapter_wte")
        config = AdapterConfig(
            adapter_len=lengths.pop() if lengths else 10, adapter_layers=len(layers), gate_activation="identity",
            bias_mode="paper" if any(LINEAR_PART.search(k) for k in self.tensors) else "none",
            train_norms=v2 and any(k.endswith("norm.weight") for k in self.tensors),
        )
        return AdapterFile(config, self.tensors, path, KIND, self.origin)
