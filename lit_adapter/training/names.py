"""Parameter names as checkpoints and adapter files spell them, whatever wraps the modules during training."""

from __future__ import annotations

from typing import Iterable

from lit_adapter.errors import LitAdapterError

STATE_PREFIX = "model."  # LitAdapterModule keeps the AdapterModel under `model`
WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name without the infixes that FSDP, activation checkpointing or torch.compile insert."""
    for infix in WRAPPER_INFIXES:
        name = name.replace(infix, "")
    return name


def check_state_keys(expected: Iterable[str], keys: Iterable[str], origin: str) -> None:
    """Fail with one line when the state dict keys `keys` (of `origin`, e.g. a checkpoint file) lack an expected one."""
    present = set(keys)
    missing = [k for k in expected if k not in present]
    if missing:
        raise LitAdapterError(
            f"{origin} lacks {len(missing)} trainable tensors (first: {missing[0]!r}); it was written for "
            "a different adapter config"
        )
