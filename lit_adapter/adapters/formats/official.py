"""The official LLaMA-Adapter releases, read into our names (reference.md §2, §3).

- V1 (flat dict): `adapter_query.weight` [L*K, dim] (block j = layer N-L+j), `layers.{i}.attention.gate` [1,H,1,1]
  or [1]; gates below layer N-L are unused. Their inference multiplies by the raw gate (gate_activation identity).
- V2 (`{'model': sd, 'config': {w_bias, w_lora, lora_rank}}`): `adapter_query.weight`, the visual adapter
  (`clip_proj*`, `visual_query`, `visual_blocks.*`, `visual_proj*`), and under `llama.`: gates, wq/wo/w1/w2/w3 biases,
  norms, `lora_w*_l{1,2}`, `new_gate`. Visual tokens are added to every layer's prompts (late fusion); the prompt
  keys/values skip LoRA, as in the official code. Their images are fed BGR (`channel_order: bgr`): the official code
  reads them with cv2.imread and hands the BGR array to PIL unchanged. The CLIP tower they name (ViT-L/14, open_clip's
  `openai` download) is built only when an image arrives; `--clip_weights PATH` gives a local copy.
- 65B chat (`{'model': sd}`): `layers.{i}.attention.wq_bias`, `wq_scale`, ... (y = W(s*x)+b on all seven linears),
  norms, and optionally `adapter_query.weight` with gates on the adapted layers only. Prompt style `chat` (the
  official demo's seeded form: `chat_official`).

Each format is a table of rules: the file's key (a full-match regex) -> our key (a `re.Match.expand` template).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import Optional

import torch

from lit_adapter.adapters.clip import clip_embed_dim
from lit_adapter.adapters.config import AdapterConfig
from lit_adapter.adapters.formats.file import AdapterFile, Tensors
from lit_adapter.adapters.visual import VisualConfig
from lit_adapter.config import ModelConfig
from lit_adapter.errors import LitAdapterError, torch_load_problem

PROMPTS = "adapter_query.weight"  # every format's prompts: [L*K, dim], split over the top L layers
VISUAL_PREFIXES = ("clip_proj.", "clip_proj_norm.", "visual_query.", "visual_blocks.", "visual_proj.",
                   "visual_proj_norm.")
_LAYER = r"(?P<layer>\d+)"
_SEAM = r"llama.layers.\g<layer>.attention.adaption_prompt"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One family of keys: `pattern` (the file's key) -> `target` (ours). A `gate` is reshaped to [1, heads, 1, 1]
    and kept only on layers that have a prompt (the official models keep unused gates on the others)."""

    pattern: str
    target: str
    gate: bool = False


V1_RULES = (
    Rule(rf"layers\.{_LAYER}\.attention\.gate", rf"{_SEAM}.gate", gate=True),
)
V2_RULES = (
    Rule(r"((?:clip_proj|clip_proj_norm|visual_query|visual_blocks|visual_proj|visual_proj_norm)\..+)", r"visual.\1"),
    Rule(r"llama\.norm\.weight", "llama.norm.weight"),
    Rule(rf"llama\.layers\.{_LAYER}\.(attention_norm|ffn_norm)\.weight", r"llama.layers.\g<layer>.\2.weight"),
    Rule(rf"llama\.layers\.{_LAYER}\.attention\.(gate|new_gate)", rf"{_SEAM}.\2", gate=True),
    Rule(rf"llama\.layers\.{_LAYER}\.(attention\.w[qo]|feed_forward\.w[123])\.bias", r"llama.layers.\g<layer>.\2.bias"),
    Rule(rf"llama\.layers\.{_LAYER}\.(attention|feed_forward)\.lora_(w[qkvo123])_(l[12])\.weight",
         r"llama.layers.\g<layer>.\2.\3.lora_\4"),
)
B65_GATE = Rule(rf"layers\.{_LAYER}\.attention\.gate", rf"{_SEAM}.gate", gate=True)
B65_RULES = (
    Rule(r"norm\.weight", "llama.norm.weight"),
    Rule(rf"layers\.{_LAYER}\.(attention|feed_forward)\.(w[qkvo123])_(bias|scale)", r"llama.layers.\g<layer>.\2.\3.\4"),
    Rule(rf"layers\.{_LAYER}\.(attention_norm|ffn_norm)\.weight", r"llama.layers.\g<layer>.\2.weight"),
    B65_GATE,
)
# kind -> (a key only that kind has (re.search), its rules, its name in messages); the first kind that matches wins
KINDS: dict[str, tuple[str, tuple[Rule, ...], str]] = {
    "official-v2": (r"^(llama\.|" + "|".join(re.escape(p) for p in VISUAL_PREFIXES) + ")", V2_RULES, "official V2"),
    "official-65b": (r"\.w[qkvo123]_(bias|scale)$", B65_RULES, "official 65B (bias/scale)"),
    "official-v1": (rf"^{re.escape(PROMPTS)}$", V1_RULES, "official V1"),
}


def read(path: Path, base: ModelConfig, adapter_len: Optional[int], visual: Optional[VisualConfig]) -> AdapterFile:
    """Read an official .pth for `base`; `adapter_len` and `visual` as in `read_adapter`."""
    state, meta = _load(path)
    kind = next((k for k, (marker, _, _) in KINDS.items() if any(re.search(marker, key) for key in state)), None)
    if kind is None:
        raise LitAdapterError(f"{path}: not a LLaMA-Adapter file (no adapter_query, llama.* or *_bias keys; "
                              f"first key {next(iter(state), None)!r})")
    mapper = _Mapper(base, path)
    count = mapper.prompts(state, _prompt_length(kind, state, adapter_len, mapper))
    mapper.rules(state, kind, range(base.n_layers - count, base.n_layers))
    if kind == "official-v1":
        config = AdapterConfig.v1(adapter_len=mapper.adapter_len, adapter_layers=count, gate_activation="identity")
    elif kind == "official-v2":
        config = _v2_config(state, meta, mapper, count, visual)
    else:
        # the 65B chat model answers in the chat template (system line, Human/Assistant, "###"); the official demo's
        # seeded form of it is prompt style chat_official
        config = AdapterConfig(adapter_len=mapper.adapter_len, adapter_layers=count, gate_activation="tanh",
                               bias_mode="official_65b", train_norms=any(k.endswith("norm.weight") for k in state),
                               prompt_style="chat")
    return AdapterFile(config, mapper.tensors, path, kind, mapper.origin)


def _load(path: Path) -> tuple[Tensors, dict]:
    """(state dict, the V2 `config` entry or {}) of a .pth."""
    try:
        with warnings.catch_warnings():  # torch's warnings about odd pickles: the error below says what matters
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike mean "not a readable checkpoint"
        raise LitAdapterError(f"{path}: {torch_load_problem(err)}") from None
    if not isinstance(data, dict):
        raise LitAdapterError(f"{path}: expected a state dict, got {type(data).__name__}")
    if isinstance(data.get("model"), dict):
        return data["model"], data.get("config", {})
    return data, {}


def _prompt_length(kind: str, state: Tensors, adapter_len: Optional[int], mapper: _Mapper) -> int:
    """K: given, else what the file shows (V2: the visual query length; 65B: rows / gated layers), else 10."""
    if adapter_len is not None and kind != "official-65b":
        return adapter_len
    if kind == "official-v2" and "visual_query.weight" in state:
        return state["visual_query.weight"].shape[0]
    if kind == "official-65b" and PROMPTS in state:
        gates = [key for key in state if re.fullmatch(B65_GATE.pattern, key)]  # the gated layers have prompts
        if not gates:
            mapper.fail(PROMPTS, "present without any layers.{i}.attention.gate")
        return state[PROMPTS].shape[0] // len(gates)
    return 10


class _Mapper:
    """Collects official tensors under our names, remembering where each came from."""

    def __init__(self, base: ModelConfig, path: Path) -> None:
        self.base, self.path = base, path
        self.tensors: Tensors = {}
        self.origin: dict[str, str] = {}
        self.adapter_len = 10

    def put(self, ours: str, official: str, tensor: torch.Tensor) -> None:
        self.tensors[ours], self.origin[ours] = tensor, official

    def fail(self, key: str, why: str) -> None:
        raise LitAdapterError(f"{self.path}: key {key!r}: {why}")

    def prompts(self, state: Tensors, adapter_len: int) -> int:
        """Split adapter_query [L*K, dim] into the prompts of the top L layers; returns L (0 without prompts)."""
        self.adapter_len = adapter_len
        if PROMPTS not in state:
            return 0
        query, n = state[PROMPTS], self.base.n_layers
        if query.ndim != 2 or query.shape[1] != self.base.dim:
            self.fail(PROMPTS, f"shape {list(query.shape)} does not fit {self.base.name!r} (dim {self.base.dim})")
        rows = query.shape[0]
        if rows % adapter_len or rows // adapter_len > n:
            self.fail(PROMPTS, f"{rows} rows are not L x {adapter_len} prompt tokens for L <= {n} layers "
                               "(set adapter_len to the file's prompt length)")
        count = rows // adapter_len
        for j, block in enumerate(query.split(adapter_len)):
            self.put(f"llama.layers.{n - count + j}.attention.adaption_prompt.prompt", PROMPTS, block)
        return count

    def rules(self, state: Tensors, kind: str, static: range) -> None:
        """Every key but the prompts through the kind's table; a key no rule matches is an error."""
        _, rules, name = KINDS[kind]
        for key, tensor in state.items():
            if key == PROMPTS:
                continue
            rule, match = _first_match(rules, key)
            if rule is None:
                self.fail(key, f"unexpected in an {name} adapter file")
            layer = self.layer(key, match["layer"]) if "layer" in match.groupdict() else None
            ours = match.expand(rule.target)
            if rule.gate:
                tensor = self.gate(key, tensor, heads=self.base.n_heads if ours.endswith(".gate") else 1)
                if layer not in static:
                    continue
            self.put(ours, key, tensor)

    def layer(self, key: str, index: str) -> int:
        i = int(index)
        if i >= self.base.n_layers:
            self.fail(key, f"layer {i} does not exist in {self.base.name!r} ({self.base.n_layers} layers): "
                           "the adapter is for another base model")
        return i

    def gate(self, key: str, tensor: torch.Tensor, heads: int) -> torch.Tensor:
        if tensor.numel() == 1:  # the first V1 release: one scalar per layer
            tensor = tensor.reshape(1, 1, 1, 1).expand(1, heads, 1, 1).clone()
        if tuple(tensor.shape) != (1, heads, 1, 1):
            self.fail(key, f"shape {list(tensor.shape)}, expected {[1, heads, 1, 1]} for {self.base.name!r}")
        return tensor


def _first_match(rules: tuple[Rule, ...], key: str) -> tuple[Optional[Rule], Optional[re.Match]]:
    for rule in rules:
        match = re.fullmatch(rule.pattern, key)
        if match:
            return rule, match
    return None, None


def _v2_config(
    state: Tensors, meta: dict, mapper: _Mapper, count: int, visual: Optional[VisualConfig]
) -> AdapterConfig:
    """The config an official V2 file implies: which of bias, norms, LoRA, new_gate and the visual adapter it has."""
    ours = mapper.tensors
    lora_rank = next((int(t.shape[0 if k.endswith("lora_l1") else 1]) for k, t in ours.items() if ".lora_l" in k), 0)
    if lora_rank and meta.get("lora_rank") not in (None, lora_rank):
        mapper.fail("config.lora_rank", f"{meta['lora_rank']} but the LoRA tensors have rank {lora_rank}")
    has_visual = any(key.startswith(VISUAL_PREFIXES) for key in state)
    return AdapterConfig(
        adapter_len=mapper.adapter_len,
        adapter_layers=count,
        gate_activation="tanh",
        bias_mode="official_7b" if any(k.startswith("llama.") and k.endswith(".bias") for k in ours) else "none",
        train_norms=any(k.startswith("llama.") and k.endswith("norm.weight") for k in ours),
        lora_rank=lora_rank,
        prompt_kv_lora=False,
        new_gate=any(k.endswith(".attention.new_gate") for k in state),
        fusion="late",
        visual=(visual or _visual_config(state, mapper.path)) if has_visual else None,
    )


def _visual_config(state: Tensors, path: Path) -> VisualConfig:
    """The official 7B visual path: CLIP ViT-L/14 (768-wide features), shapes read from the file."""
    try:
        width = state["visual_query.weight"].shape[1]
        embed = state["clip_proj.weight"].shape[1]
        hidden = state["visual_blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise LitAdapterError(f"{path}: key {err.args[0]!r} missing from the visual adapter") from None
    if embed != clip_embed_dim("ViT-L-14"):
        raise LitAdapterError(f"{path}: key 'clip_proj.weight' takes {embed}-wide CLIP features, not ViT-L-14's; "
                              "pass the visual config of its CLIP model")
    blocks = {int(m[1]) for k in state if (m := re.match(r"visual_blocks\.(\d+)\.", k))}
    # channel order BGR: the official code reads images with cv2.imread and hands the BGR array to PIL unchanged
    # (training, demo and MME evaluation alike), so these weights were trained on red and blue swapped
    return VisualConfig(clip_model="ViT-L-14", clip_pretrained="openai", mode="tokens",
                        visual_len=state["visual_query.weight"].shape[0], n_blocks=len(blocks), block_heads=16,
                        mlp_ratio=hidden / width, width=width, channel_order="bgr")
