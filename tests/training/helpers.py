"""Shared pieces of the training tests: tiny adapters and data, quiet trainers, callbacks, CLI runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from lightning.pytorch import Callback, Trainer

from lit_adapter.adapters import AdapterConfig
from lit_adapter.adapters.visual import TINY_CLIP_MODEL
from lit_adapter.data.caption import CaptionDataModule
from lit_adapter.data.instruction import InstructionDataModule
from lit_adapter.data.joint import JointDataModule
from lit_adapter.training.module import LitAdapterModule
from lit_adapter.training.precision import trainer_precision
from tests.helpers import run_cli as run_command
from tests.helpers import tiny_visual

REPO = Path(__file__).resolve().parents[2]
WORDS = ["cat", "dog", "sun", "tree", "ball", "cake", "bird", "fish", "frog", "star", "moon", "boat"]


def tiny_adapter(visual: bool = True, clip_weights: Optional[Path] = None) -> AdapterConfig:
    """V2 (paper bias/scale, norms) with early-fused visual prompts on stories260K; the raw prompt style keeps the
    tiny records short."""
    return AdapterConfig.v2(adapter_len=4, visual=tiny_visual(clip_weights) if visual else None, prompt_style="raw")


def adapter_model(checkpoint_dir: Path, config: AdapterConfig) -> torch.nn.Module:
    """The base model of `checkpoint_dir` with `config`'s adapters (float32, on CPU), built as training builds it."""
    from lit_adapter.adapters import build_adapter_model

    return build_adapter_model(checkpoint_dir, config)


def write_tiny_clip_weights(path: Path, seed: int = 0) -> Path:
    from lit_adapter.adapters.visual import load_open_clip

    torch.manual_seed(seed)
    torch.save(load_open_clip().create_model(TINY_CLIP_MODEL).state_dict(), path)
    return path


def write_instructions(path: Path, count: int = 24) -> Path:
    """Short records (raw prompt style keeps them ~15 tokens)."""
    records = [
        {"instruction": f"Say {WORDS[i % len(WORDS)]} {i // len(WORDS) + 1} times.", "output": WORDS[i % len(WORDS)]}
        for i in range(count)
    ]
    path.write_text(json.dumps(records))
    return path


def instruction_data(path: Path, batch_size: int = 4, val_split: int = 4) -> InstructionDataModule:
    return InstructionDataModule(str(path), max_seq_length=32, batch_size=batch_size, val_split=val_split)


def caption_data(batch_size: int = 4) -> CaptionDataModule:
    return CaptionDataModule("builtin:demo", max_seq_length=48, batch_size=batch_size)


def joint_data(
    lit: LitAdapterModule, instructions: Optional[Path], captions: bool = True, batch_size: int = 4, **kw: Any
) -> JointDataModule:
    """The tiny joint data, with the settings of the model `lit` trains (as `lit-adapter fit` links them)."""
    return JointDataModule(
        instruction=instruction_data(instructions, batch_size) if instructions is not None else None,
        caption=caption_data(batch_size) if captions else None,
        model_settings=lit.data_settings,
        **kw,
    )


def module(checkpoint_dir: Path, visual: bool = True, **kw: Any) -> LitAdapterModule:
    kw = {"learning_rate": 1e-2, "weight_decay": 0.1, "warmup_steps": 0, **kw}
    return LitAdapterModule(checkpoint_dir=str(checkpoint_dir), adapter=tiny_adapter(visual), **kw)


def trainer(root: Path, **kw: Any) -> Trainer:
    """A quiet single-process CPU trainer: no logger, no progress bar, no validation, no checkpoints by default; a
    half "-true" precision becomes the AdapterPrecision plugin (as `lit-adapter fit` makes it)."""
    settings = dict(
        accelerator="cpu", devices=1, precision="32-true", max_steps=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=str(root),
    )  # fmt: skip
    settings = {**settings, **kw}
    precision = trainer_precision(settings["precision"])
    settings["precision"] = precision["precision"]
    settings["plugins"] = [*settings.get("plugins", []), *precision["plugins"]]
    return Trainer(**settings)


def set_gates(model: torch.nn.Module, value: float) -> None:
    """Open every zero-init gate so that every adapter parameter gets a gradient from the first step."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate"):
                param.fill_(value)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def all_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Snapshots(Callback):
    """Every parameter after each optimizer step, plus the source of the step's batches."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.sources: list[str] = []

    def on_train_start(self, trainer: Trainer, pl_module: LitAdapterModule) -> None:
        self.states.append(all_state(pl_module.model))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.states.append(all_state(pl_module.model))
            self.sources.append(batch["source"])


class KillAfterStep(Callback):
    """SIGKILLs its own process when step `step` is done (and so its checkpoint written): a crash, not an exit."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveRankState(Callback):
    """At the end of fit each process saves its trainable tensors to `<folder>/rank<r>.pt`."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module) -> None:
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        torch.save(trainable_state(pl_module.model), Path(self.folder) / f"rank{trainer.global_rank}.pt")


def fit_config(
    root: Path, checkpoint_dir: Path, instructions: Path, max_steps: int, clip_weights: Optional[Path] = None,
    **trainer: Any,
) -> dict:
    """A `lit-adapter fit` config for the tiny joint setup."""
    visual = tiny_visual(clip_weights)
    return {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": max_steps,
            "default_root_dir": str(root), "enable_progress_bar": False, "enable_model_summary": False,
            "num_sanity_val_steps": 0, "limit_val_batches": 0, "log_every_n_steps": 1, **trainer,
        },
        "model": {
            "checkpoint_dir": str(checkpoint_dir),
            "adapter": AdapterConfig.v2(adapter_len=4, visual=visual, prompt_style="raw").to_dict(),
            "learning_rate": 0.01, "weight_decay": 0.1, "warmup_steps": 2,
        },
        "data": {
            "instruction": {
                "class_path": "lit_adapter.data.instruction.InstructionDataModule",
                "init_args": {"data_path": str(instructions), "max_seq_length": 32, "batch_size": 4, "val_split": 4},
            },
            "caption": {
                "class_path": "lit_adapter.data.caption.CaptionDataModule",
                "init_args": {"data_path": "builtin:demo", "max_seq_length": 48, "batch_size": 4},
            },
        },
    }  # fmt: skip


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_cli(args: list[str], env: Optional[dict[str, str]] = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m lit_adapter.cli ARGS` from the repository root (one thread per process: the machine is small)."""
    return run_command(*args, env=env, timeout=timeout)
