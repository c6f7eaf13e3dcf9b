"""Where a model runs: device and dtype from the user's words, and the peak memory a run used."""

from __future__ import annotations

import resource
from contextlib import contextmanager
from typing import Iterator

import torch

from lit_adapter.errors import LitAdapterError

PRECISION_DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}


DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(device: str) -> torch.device:
    """"auto" is the first GPU when there is one, else the CPU; otherwise a device this machine has."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        chosen = None
    if chosen is None or chosen.type not in DEVICE_TYPES:
        raise LitAdapterError(f"--device {device}: not a device lit-adapter runs on; pass cpu, cuda, cuda:N, mps "
                              "or auto")
    check_available(chosen, device)
    return chosen


def check_available(device: torch.device, spelled: str) -> None:
    """Fail with one line when this machine lacks `device` (rather than later, blaming a file loaded onto it)."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise LitAdapterError(f"--device {spelled}: this machine has no CUDA GPU that torch can use; pass "
                                  "--device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise LitAdapterError(f"--device {spelled}: this machine has {count} CUDA GPU(s) (cuda:0 to "
                                  f"cuda:{count - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LitAdapterError(f"--device {spelled}: Apple's MPS is not available here; pass --device cpu (or auto)")


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """"auto" is bf16 on a GPU that has it, else float32; otherwise one of PRECISION_DTYPES."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if precision not in PRECISION_DTYPES:
        raise LitAdapterError(f"--precision {precision}: expected auto or one of {', '.join(PRECISION_DTYPES)}")
    return PRECISION_DTYPES[precision]


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype set to `dtype` inside the block only (modules built there get it), restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA), else the process's peak resident memory (CPU runs)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux
