"""The figures of a run (training.yaml) and the summary printed at the end of fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lit_adapter.devices import peak_memory_gb


def run_figures(trainer: Any, module: Any, tokens_per_second: float) -> dict[str, Any]:
    """The figures of a fit: trainable parameters per group, optimizer steps, throughput, peak memory, validation
    loss before (the sanity check) and after."""
    return {
        "trainable_parameters": dict(module.group_sizes),
        "optimizer_steps": int(trainer.global_step),
        "tokens_per_second": round(tokens_per_second, 1),
        "peak_memory_gb": round(peak_memory_gb(module.device), 3),
        "val_loss_before": module.initial_val_loss,
        "val_loss_after": module.last_val_loss,
    }


def format_summary(figures: dict[str, Any], exported: Optional[Path]) -> str:
    """The lines printed at the end of fit, from `run_figures`."""
    params = figures["trainable_parameters"]
    lines = [
        "training summary",
        f"  trainable parameters: {sum(params.values()):,} "
        f"({', '.join(f'{name} {count:,}' for name, count in params.items())})",
        f"  optimizer steps: {figures['optimizer_steps']}",
        f"  throughput: {figures['tokens_per_second']:,.0f} tokens/s",
        f"  peak memory: {figures['peak_memory_gb']:.2f} GB",
    ]
    if figures["val_loss_before"] is not None or figures["val_loss_after"] is not None:
        before, after = (f"{v:.4f}" if v is not None else "-" for v in (figures["val_loss_before"],
                                                                       figures["val_loss_after"]))
        lines.append(f"  validation loss: {before} -> {after}")
    lines.append(f"  adapter: {exported}" if exported else "  adapter: not exported")
    return "\n".join(lines)
