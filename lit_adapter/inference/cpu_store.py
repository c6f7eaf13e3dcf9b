"""CPU decoding settings kept between commands: measured once per machine and model shape, then read back.

`CPUDecoding.for_model` measures its settings in about half a second for a small model, a tenth of a short
`generate`. The thread count depends on how busy the cores are right now, so it is measured in every process (a
third of that time); the kernel, weight-layout and float32-product choices depend on the processor and the model,
so commands (`Engine.load`) keep them in the cache (`$LIT_ADAPTER_CACHE/cpu-settings.json`, ~/.cache/lit-adapter
by default), as compilers keep autotuning results: one entry per processor (vendor, family, model, name, vector
flags, cores), torch version and vector capability, default and chosen thread count, dtype and linear weight
shapes. An entry older than `MAX_AGE_DAYS` is measured again, and `LIT_ADAPTER_CPU_SETTINGS=fresh` measures again
now. A missing, unreadable or foreign file is measured over, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

STORE_NAME = "cpu-settings.json"
MAX_AGE_DAYS = 7
ENV = "LIT_ADAPTER_CPU_SETTINGS"  # "fresh": measure again and replace the stored entry


def default_store() -> Path:
    from lit_adapter.download import cache_dir

    return cache_dir() / STORE_NAME


def measure_again() -> bool:
    return os.environ.get(ENV, "").strip().lower() == "fresh"


@lru_cache(maxsize=1)
def processor() -> str:
    """What identifies this processor's kernels' speed: /proc/cpuinfo's identity lines (flags hashed), cores."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                name, _, value = line.partition(":")
                name = name.strip()
                if name in ("vendor_id", "cpu family", "model", "model name", "flags") and name not in fields:
                    fields[name] = value.strip()
                if not line.strip() and fields:
                    break  # the first processor's block is enough
    except OSError:
        fields["processor"] = platform.processor()
    if "flags" in fields:
        fields["flags"] = hashlib.sha256(fields["flags"].encode()).hexdigest()[:16]
    return json.dumps([platform.machine(), fields, os.cpu_count()], sort_keys=True)


def entry_key(model_key: tuple) -> str:
    """The store's key for a model's settings key (shapes, dtype, default and chosen threads) on this processor
    and torch."""
    return json.dumps([processor(), torch.__version__, torch.backends.cpu.get_cpu_capability(), repr(model_key)])


def read(store: Path, key: str) -> Optional[tuple]:
    """The stored (one_row_kernels, column_major, float32_products) for `key`, unless absent, unreadable or older
    than MAX_AGE_DAYS."""
    entry = _entries(store).get(key)
    try:
        if time.time() - float(entry["measured_at"]) > MAX_AGE_DAYS * 86400:
            return None
        return (bool(entry["one_row_kernels"]),
                frozenset(tuple(shape) for shape in entry["column_major"]),
                frozenset(((out, in_), rows) for out, in_, rows in entry["float32_products"]))
    except (TypeError, KeyError, ValueError):  # no entry, or one written by another version
        return None


def write(store: Path, key: str, choices: tuple) -> None:
    """Add or replace the entry for `key` (atomically; a store that cannot be written is left as it is)."""
    from lit_adapter.files import write_json

    one_row, column_major, float32_products = choices
    entries = _entries(store)
    entries[key] = {"one_row_kernels": one_row, "column_major": sorted(column_major),
                    "float32_products": sorted([*shape, rows] for shape, rows in float32_products),
                    "measured_at": time.time()}
    try:
        write_json(entries, store)
    except OSError:
        pass  # a read-only cache only costs the next command its measurement


def _entries(store: Path) -> dict:
    try:
        data = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
