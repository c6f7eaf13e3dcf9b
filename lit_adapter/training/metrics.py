"""What a step measures: the non-finite guard, and the validation loss (token-weighted over whole validation sets, per
source, reduced over all processes).

The guard (`NonFiniteGuard`, a callback the module adds itself, so every fit has it) keeps non-finite numbers out of
everything a run leaves behind:
- before backward, a non-finite loss (of any process) stops the run: the step is never taken;
- before the optimizer step (in `on_before_optimizer_step`, so before clipping and group routing), non-finite
  gradients (of any process) stop the run too, or with `action="skip"` the step is skipped (every gradient dropped:
  AdamW leaves a parameter without a gradient untouched, moments and step count included) and counted, as large-scale
  trainers do; `skip_limit` skipped steps in a row stop the run all the same. Under fp16 loss scaling the scaler
  already skips steps with overflowing gradients, and the gradient check is left to it;
- after each step, parameters the update itself made non-finite (finite gradients times a huge learning rate) stop the
  run before the checkpoint callbacks of that step run;
- a checkpoint about to be written whose trainable or optimizer tensors are not all finite is refused (it is never
  written, nor is the `last` file or link), which also covers an optimizer state that overflowed.
The stop is one line naming the step, the batch's source and the last finite checkpoint to resume from. `AdapterExport`
refuses to export non-finite tensors likewise.

Steps are counted as Lightning logs them: "step N" is the update after N good ones, so it resumes from the checkpoint
named step-N (a skipped step still counts, and still moves the learning-rate schedule).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Optional

import torch
from lightning.pytorch import Callback

from lit_adapter.data.batch import SOURCES
from lit_adapter.errors import EveryRankError, LitAdapterError

STOP, SKIP = "stop", "skip"


def nonfinite_count(tensors: Iterable[torch.Tensor]) -> int:
    """How many of the floating-point `tensors` hold a NaN or an infinity."""
    tensors = [t.detach() for t in tensors if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not tensors:
        return 0
    return int(torch.stack([torch.isfinite(t).all() for t in tensors]).logical_not().sum())


def everywhere(trainer: Any, local: bool) -> bool:
    """True when `local` is true in every process (a collective call under more than one process)."""
    if trainer.world_size > 1:
        return bool(trainer.strategy.reduce_boolean_decision(local, all=True))
    return local


def checkpoint_tensors(checkpoint: dict[str, Any], keys: Optional[set[str]]) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint carries that training changes: the state-dict entries named in `keys` (None: all) and
    every optimizer state tensor."""
    found = {name: t for name, t in checkpoint.get("state_dict", {}).items() if keys is None or name in keys}

    def walk(prefix: str, value: Any) -> None:
        if torch.is_tensor(value):
            found[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(f"{prefix}.{index}", item)

    walk("optimizer_states", checkpoint.get("optimizer_states", []))
    return found


def resume_option(trainer: Any) -> Optional[tuple[str, str, str]]:
    """(path, whose, option) of the checkpoint to resume from after a stop: the newest this run wrote (each passed
    the guard), else the one it resumed from, else the one `--ckpt_path last` resolves to (an earlier run's in the same
    folder). `option` is `--ckpt_path last` where that resolves to it (a resume that also takes the options given
    now, a lower learning rate included), else `--ckpt_path PATH`."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    lasts = [p for cb in callbacks if cb.dirpath for p in cb._find_last_checkpoints(trainer) if os.path.isfile(p)]
    newest_last = max(lasts, key=os.path.getmtime) if lasts else None
    written = [p for cb in callbacks for p in (cb.last_model_path, cb.best_model_path) if p and os.path.isfile(p)]
    if written:
        found = max(written, key=os.path.getmtime), "this run's"
    elif trainer.ckpt_path and os.path.isfile(trainer.ckpt_path):
        found = str(trainer.ckpt_path), "the one this run resumed from"
    elif newest_last:
        found = newest_last, "an earlier run's"
    else:
        return None
    is_last = newest_last is not None and os.path.realpath(newest_last) == os.path.realpath(found[0])
    return (*found, "--ckpt_path last" if is_last else f"--ckpt_path {found[0]}")


class NonFiniteGuard(Callback):
    """Stops a fit (or skips the step) on a non-finite loss or gradient, and refuses non-finite checkpoints (see the
    module docstring).

    Args:
        action: "stop" (default): stop the run with one line; "skip": skip the step and count it
        skip_limit: with "skip", this many skipped steps in a row stop the run
    """

    def __init__(self, action: str = STOP, skip_limit: int = 10) -> None:
        if action not in (STOP, SKIP):
            raise LitAdapterError(f"nonfinite: {action!r} is neither {STOP!r} nor {SKIP!r}")
        if skip_limit < 1:
            raise LitAdapterError(f"skip_limit: {skip_limit} must be at least 1")
        self.action = action
        self.skip_limit = skip_limit
        self.skipped = 0  # steps skipped over the whole run (kept in checkpoints)
        self.in_a_row = 0
        self.source: Optional[str] = None
        self._step_taken = False

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    # ---- before the step ----

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        source = batch.get("source") if isinstance(batch, dict) else None
        self.source = source if source in SOURCES else None

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        if self.action == STOP and not everywhere(trainer, bool(torch.isfinite(loss.detach()).all())):
            value = loss.item() if loss.numel() == 1 and not torch.isfinite(loss) else "not finite in some process"
            raise self.stopped(trainer, f"the training loss is {value}")

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        self._step_taken = True
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16 loss scaling: overflowing steps are the scaler's to skip
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = nonfinite_count(p.grad for p in params)
        if everywhere(trainer, bad == 0):
            self.in_a_row = 0
            return
        what = f"the gradients of {bad or 'some'} of {len(params)} parameter tensors are not finite"
        if self.action == STOP:
            raise self.stopped(trainer, what)
        if self.in_a_row + 1 >= self.skip_limit:
            raise self.stopped(trainer, f"{what}, {self.in_a_row + 1} steps in a row (skip_limit {self.skip_limit})")
        for param in params:
            param.grad = None
        self._step_taken = False
        self.skipped += 1
        self.in_a_row += 1
        if trainer.is_global_zero:
            print(f"warning: {self.where(trainer)}: {what}; step skipped ({self.skipped} so far)", file=sys.stderr,
                  flush=True)  # fmt: skip

    # ---- after the step ----

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._step_taken:
            self._step_taken = False
            bad = nonfinite_count(p for p in pl_module.parameters() if p.requires_grad)
            if not everywhere(trainer, bad == 0):
                raise self.stopped(trainer, f"the update made {bad or 'some'} parameter tensors non-finite",
                                   step=trainer.global_step - 1, taken=True)  # fmt: skip
        if self.action == SKIP:
            pl_module.log("skipped_steps", float(self.skipped))

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        names = set(pl_module.trainable_names()) if hasattr(pl_module, "trainable_names") else None
        tensors = checkpoint_tensors(checkpoint, names)
        bad = [name for name, tensor in tensors.items() if nonfinite_count([tensor])]
        if not everywhere(trainer, not bad):
            example = f" (e.g. {bad[0]})" if bad else ""
            raise self.stopped(trainer, f"the checkpoint would hold {len(bad) or 'some'} non-finite tensors{example}",
                               step=trainer.global_step - 1, taken=True)  # fmt: skip

    # ---- the message ----

    def where(self, trainer: Any, step: Optional[int] = None) -> str:
        step = trainer.global_step if step is None else step
        return f"step {step}" + (f" ({self.source} batch)" if self.source else "")

    def stopped(self, trainer: Any, what: str, step: Optional[int] = None, taken: bool = False) -> EveryRankError:
        """The one-line error that stops the run: the step, the source, what was not finite, where to resume (every
        rank decides it together, `everywhere`)."""
        last = resume_option(trainer)
        done = "training stopped" if taken else "training stopped before the step"
        skipped = f" ({self.skipped} earlier steps skipped)" if self.skipped else ""
        if last:
            advice = (f"the last finite checkpoint is {last[0]} ({last[1]}): resume from it with {last[2]} and a "
                      "lower model.learning_rate, or check the data")  # fmt: skip
        else:
            advice = "no checkpoint to resume from yet: lower model.learning_rate or check the data and start again"
        return EveryRankError(f"{self.where(trainer, step)}: {what}; {done}{skipped} and saved nothing non-finite; "
                               f"{advice}")  # fmt: skip


class SourceLosses:
    """Sums of token losses and token counts per source, accumulated over a validation epoch."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}

    def reset(self) -> None:
        self.sums = {}

    def add(self, source: str, total: torch.Tensor, count: torch.Tensor) -> None:
        sums = self.sums.setdefault(source, [0.0, 0.0])
        sums[0] += float(total)
        sums[1] += float(count)

    def reduce(self, strategy: Any, device: torch.device) -> tuple[Optional[float], dict[str, float]]:
        """(the loss over every set, {source: loss}), summed over all processes in float64; (None, {}) without
        validation data. A collective call: every process takes part."""
        losses = {}
        for source in SOURCES:
            sums = torch.tensor(self.sums.get(source, [0.0, 0.0]), dtype=torch.float64, device=device)
            sums = strategy.reduce(sums, reduce_op="sum")
            if sums[1] > 0:
                losses[source] = sums
        if not losses:
            return None, {}
        total = sum(losses.values())
        return float(total[0] / total[1]), {source: float(s[0] / s[1]) for source, s in losses.items()}
