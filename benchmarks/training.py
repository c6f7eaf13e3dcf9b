"""One adapter training step, shared by the CPU (train_step.py) and GPU (gpu.py) benchmarks.

Our side's best mode is "bf16-true": the frozen base in the low precision, every trainable parameter (and so AdamW's
state) in float32. `build_ours` builds the random base directly in its dtype on its device (no float32 copy).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch

from benchmarks.protos import apply_protos
from lit_adapter.data.batch import IGNORE_INDEX

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_batch(vocab_size: int, batch_size: int, seq_len: int, device: Any = "cpu", seed: int = 0) -> dict:
    """Random tokens; each row's first 1/8..1/2 (the "prompt") is excluded from the loss."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=generator)
    labels = input_ids.clone()
    prompt_lens = torch.randint(seq_len // 8, seq_len // 2 + 1, (batch_size,), generator=generator)
    for row, length in enumerate(prompt_lens.tolist()):
        labels[row, :length] = IGNORE_INDEX
    return {"input_ids": input_ids.to(device), "labels": labels.to(device)}


def random_base(config: Any, dtype: torch.dtype, device: Any):
    """A random-init LLaMA made directly in `dtype` on `device` (structure on the meta device, then filled)."""
    from lit_adapter.checkpoint import meta_model
    from lit_adapter.devices import default_dtype

    with default_dtype(dtype):
        base = meta_model(config)
    base.to_empty(device=device)
    base.reset_parameters()
    return base


def mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the supervised positions from full logits, in float32 (the peer's loss)."""
    from lit_adapter.training.loss import masked_cross_entropy

    total, count = masked_cross_entropy(logits, labels)
    return total / count.clamp(min=1)


def ours_loss(model: Any) -> LossFn:
    """The training module's loss (`LitAdapterModule.loss_sums`): hidden states, then the classifier and
    cross-entropy on the supervised positions only."""
    from lit_adapter.training.loss import head_cross_entropy

    def loss(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total, count = head_cross_entropy(model(input_ids, hidden_only=True), model.llama.output, labels)
        return total / count.clamp(min=1)

    return loss


def build_ours(config: Any, adapter_config: Any, dtype: torch.dtype, device: Any, protos: list[str]):
    """(AdapterModel, loss(input_ids, labels), trainable parameters upcast to float32 from `dtype`)."""
    from lit_adapter.adapters import attach_adapters

    model = attach_adapters(random_base(config, dtype, device), adapter_config)
    upcast = [p for p in model.parameters() if p.requires_grad and p.dtype != torch.float32]
    for param in upcast:
        param.data = param.data.float()
    apply_protos(model, protos)
    return model, ours_loss(model), upcast


def make_step(model: torch.nn.Module, loss_fn: LossFn, batch: dict) -> Callable[[], float]:
    """forward + loss + backward + AdamW step over the trainable parameters; returns the loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.02)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(batch["input_ids"], batch["labels"])
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def first_step(model: torch.nn.Module, loss_fn: LossFn, batch: dict, upcast: list, dtype: torch.dtype,
               errors: list[str]) -> tuple[Callable[[], float], float]:
    """Build the step and run it once. If float32 trainable parameters that came from a low-precision base (the
    V2 norms) fail there, record the error and train those in the base dtype instead (the training module's mode)."""
    step = make_step(model, loss_fn, batch)
    try:
        return step, step()
    except RuntimeError as err:
        if not upcast:
            raise
        errors.append(f"float32 trainable norms in a {str(dtype).removeprefix('torch.')} base: "
                      f"{type(err).__name__}: {err}")
        for param in upcast:
            param.data = param.data.to(dtype)
        step = make_step(model, loss_fn, batch)
        return step, step()


def time_steps(step: Callable[[], float], warmup: int, steps: int,
               sync: Optional[Callable[[], None]] = None) -> dict[str, list[float]]:
    """Wall and process CPU seconds of the `steps` timed steps after `warmup` untimed ones, and every loss."""
    sync = sync or (lambda: None)
    out: dict[str, list[float]] = {"wall": [], "cpu": [], "losses": []}
    for index in range(warmup + steps):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        out["losses"].append(step())
        sync()
        if index >= warmup:
            out["wall"].append(time.perf_counter() - start)
            out["cpu"].append(time.process_time() - cpu_start)
    return out


def timing_summary(times: dict[str, list[float]], tokens: int, threads: int) -> dict[str, Any]:
    """Median and best step time, tokens/s from each, and how much of `threads` cores the process got."""
    from benchmarks import harness

    wall = times["wall"]
    return {
        "step_s": harness.median(wall), "step_s_best": min(wall), "step_s_all": [round(t, 4) for t in wall],
        "tokens_per_s": tokens / harness.median(wall), "tokens_per_s_best": tokens / min(wall),
        "cpu_use": sum(times["cpu"]) / sum(wall) / threads,
    }


def trainable_summary(model: torch.nn.Module) -> dict[str, Any]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"trainable_params": sum(p.numel() for p in trainable),
            "trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in trainable})}
