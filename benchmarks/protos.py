"""Prototype optimisations of our side, applied inside a benchmark process only (`--proto`).

A prototype is a candidate change to lit_adapter, measured here before it is made there. Those that paid off are now
in the library (see benchmarks/README.md: the loss on supervised positions only, complex RoPE, SiluMul, lazy CLIP
imports); what remains:

- compile: torch.compile every block (its compile time falls in the warm-up steps). The training module offers the
  same as `model.compile_blocks: true`.
"""

from __future__ import annotations

from typing import Any

PROTOS = {
    "compile": "torch.compile every block",
}


def apply_protos(model: Any, names: list[str]) -> None:
    """Apply the prototypes named to an AdapterModel, in place."""
    if "compile" in names:
        for block in model.llama.layers:
            block.compile()
