"""AdapterConfig: one dataclass selects every LLaMA-Adapter mechanism (V1 prompts, V2 bias/scale, LoRA, visuals)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from lit_adapter.adapters.visual import VisualConfig
from lit_adapter.config import LINEAR_NAMES, ModelConfig, check_known_keys
from lit_adapter.errors import LitAdapterError

ATTENTION_LINEARS = ("wq", "wk", "wv", "wo")
GATE_ACTIVATIONS = ("tanh", "identity")
# "bias" (y = Wx + b on all seven linears) is what `merge` leaves of "paper" and "official_65b" once the scales are
# folded into the base weights.
BIAS_MODES = ("none", "paper", "official_7b", "official_65b", "bias")
FUSIONS = ("early", "late")
GATE_SHAPES = ("head", "layer")


@dataclass
class AdapterConfig:
    """Which adapters to attach to a frozen LLaMA, and how.

    adapter_len: K, the number of learned prompt tokens per adapted layer.
    adapter_layers: L, the top L layers get a static prompt; 0 = none; negative -n = all layers but the first n
        (the V2 preset uses -1: 31 of 32 layers on 7B).
    gate_activation: tanh (official training, V2) or identity (official inference of the released V1 file).
    bias_mode: V2 bias tuning. paper: y = s*(Wx+b) on every linear of every block; official_7b: y = Wx+b on wq, wo,
        w1, w2, w3; official_65b: y = W(s*x)+b on all seven; bias: y = Wx+b on all seven (a merged adapter).
    train_norms: also train every RMSNorm (the final norm included).
    lora_rank: LoRA rank on `lora_targets`, 0 = off. lora_alpha: scaling alpha/rank; None = no scaling (official).
    prompt_kv_lora: the prompt keys/values go through wk/wv's LoRA too; False = the official V2 code (base projection).
    new_gate: a V2 scalar gate (init 1) multiplying each layer's gated prompt term (official with LoRA).
    fusion: early (paper): the visual tokens are their own gated prompt in the first `visual_layers` layers;
        late (official code, V1 multimodal): the visual tokens are added to the static prompt of every adapted layer.
    visual: the visual encoder; None = text only.
    prompt_style: the prompt template the adapter was trained with.
    gate_shape: head (the papers': one gate per attention head) or layer (one gate per layer, shared by its heads,
        as PEFT's AdaptionPrompt has it, so that `lit-adapter export --format peft` is exact); the static prompt's
        gate only.
    """

    adapter_len: int = 10
    adapter_layers: int = 30
    gate_activation: Literal["tanh", "identity"] = "tanh"
    bias_mode: Literal["none", "paper", "official_7b", "official_65b", "bias"] = "none"
    train_norms: bool = False
    lora_rank: int = 0
    lora_alpha: Optional[float] = None
    lora_targets: list[str] = field(default_factory=lambda: list(LINEAR_NAMES))
    prompt_kv_lora: bool = True
    new_gate: bool = False
    fusion: Literal["early", "late"] = "early"
    visual_layers: int = 1
    visual: Optional[VisualConfig] = None
    prompt_style: str = "alpaca"
    gate_shape: Literal["head", "layer"] = "head"

    def __post_init__(self) -> None:
        if isinstance(self.visual, dict):
            self.visual = _visual_from_dict(self.visual)
        self.lora_targets = list(self.lora_targets)
        self.validate()

    @classmethod
    def v1(cls, **overrides: Any) -> AdapterConfig:
        """LLaMA-Adapter V1: K=10 prompts on the top 30 layers, zero-init gates; a global visual token is late-fused."""
        visual = overrides.get("visual")
        if isinstance(visual, VisualConfig) and visual.mode == "global":
            overrides.setdefault("fusion", "late")
        return cls(**{"adapter_len": 10, "adapter_layers": 30, **overrides})

    @classmethod
    def v2(cls, **overrides: Any) -> AdapterConfig:
        """LLaMA-Adapter V2 (paper): prompts on all layers but the first, bias/scale on every linear, norms trained."""
        return cls(**{"adapter_layers": -1, "bias_mode": "paper", "train_norms": True, **overrides})

    def validate(self) -> None:
        _check(self.adapter_len >= 1, f"adapter_len must be at least 1, got {self.adapter_len}")
        _check_choice("gate_activation", self.gate_activation, GATE_ACTIVATIONS)
        _check_choice("bias_mode", self.bias_mode, BIAS_MODES)
        _check_choice("fusion", self.fusion, FUSIONS)
        _check_choice("gate_shape", self.gate_shape, GATE_SHAPES)
        _check(self.lora_rank >= 0, f"lora_rank must be 0 (off) or positive, got {self.lora_rank}")
        _check(self.lora_alpha is None or self.lora_alpha > 0, f"lora_alpha must be positive, got {self.lora_alpha}")
        unknown = [t for t in self.lora_targets if t not in LINEAR_NAMES]
        _check(not unknown, f"lora_targets: unknown {unknown}; choose among {list(LINEAR_NAMES)}")
        _check(len(set(self.lora_targets)) == len(self.lora_targets), "lora_targets: duplicate names")
        _check(self.lora_rank == 0 or self.lora_targets, "lora_rank > 0 needs at least one name in lora_targets")
        _check(self.visual_layers >= 1, f"visual_layers must be at least 1, got {self.visual_layers}")
        _check(
            self.visual is None or isinstance(self.visual, VisualConfig),
            f"visual must be a VisualConfig, got {type(self.visual).__name__}",
        )
        if self.visual is not None and self.fusion == "late":
            _check(self.adapter_layers != 0, "fusion 'late' adds the visual tokens to the static prompts: "
                                             "adapter_layers must not be 0 (or use fusion 'early')")
            _check(
                self.visual_tokens in (1, self.adapter_len),
                f"fusion 'late' adds the {self.visual_tokens} visual tokens to the {self.adapter_len} prompt tokens: "
                "visual.visual_len must equal adapter_len (or use fusion 'early')",
            )

    @property
    def visual_tokens(self) -> int:
        """How many tokens the visual encoder gives per image (0 without one)."""
        if self.visual is None:
            return 0
        return self.visual.num_tokens

    def check_model(self, model: ModelConfig) -> None:
        """Fail with one line if this adapter cannot attach to `model`."""
        n = model.n_layers
        _check(abs(self.adapter_layers) <= n, f"adapter_layers {self.adapter_layers} exceeds the {n} layers of "
                                              f"{model.name!r}; use at most {n} (-1 = all but the first layer)")
        if self.visual is not None and self.fusion == "early":
            _check(self.visual_layers <= n,
                   f"visual_layers {self.visual_layers} exceeds the {n} layers of {model.name!r}")

    def static_layers(self, n_layers: int) -> range:
        """The layer indices that get a static prompt."""
        count = self.adapter_layers if self.adapter_layers >= 0 else n_layers + self.adapter_layers
        return range(n_layers - count, n_layers)

    def visual_prompt_layers(self, n_layers: int) -> range:
        """The layer indices where the visual tokens are their own gated prompt (early fusion)."""
        if self.visual is None or self.fusion != "early":
            return range(0)
        return range(min(self.visual_layers, n_layers))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lora_targets"] = list(self.lora_targets)
        if data["gate_shape"] == "head":
            del data["gate_shape"]  # the default: files of per-head adapters stay as they were
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> AdapterConfig:
        check_known_keys(cls, data, source)
        try:
            return cls(**data)
        except LitAdapterError as err:
            raise LitAdapterError(f"{source}: {str(err).removeprefix('adapter config: ')}") from None
        except TypeError as err:
            raise LitAdapterError(f"{source}: {err}") from None


def _visual_from_dict(data: dict[str, Any]) -> VisualConfig:
    known = {f.name for f in dataclasses.fields(VisualConfig)}
    unknown = sorted(set(data) - known)
    _check(not unknown, f"visual: unknown keys {unknown}; expected a subset of {sorted(known)}")
    return VisualConfig(**data)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise LitAdapterError(f"adapter config: {message}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name} must be one of {list(choices)}, got {value!r}")
