"""Parameter names as checkpoints and adapter files spell them, whatever wraps the modules during training."""

from __future__ import annotations

STATE_PREFIX = "model."  # LitAdapterModule keeps the AdapterModel under `model`
WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name without the infixes that FSDP, activation checkpointing or torch.compile insert."""
    for infix in WRAPPER_INFIXES:
        name = name.replace(infix, "")
    return name
