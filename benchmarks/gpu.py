"""A LLaMA-7B-shaped model (random weights, bf16) on one GPU: adapter training tokens/s, MFU, peak memory, generation.

    python -m benchmarks.gpu --json gpu.json                     # needs a CUDA GPU (about 14 GB of weights)
    python -m benchmarks.gpu --peak_tflops 790 --batch_size 4    # another GPU's dense bf16 peak, smaller batches
    python -m benchmarks.gpu --device cpu --tiny                 # a tiny model on the CPU: checks the code path only

Training runs: V1 (K=10 prompts on all layers but the first two, as the official 7B recipe) and V2 (paper preset),
each with and without activation checkpointing (every block recomputed in backward). The base is frozen bf16 and the
trainable parameters float32 ("bf16-true"). MFU counts the compute a frozen-base adapter step cannot avoid:
4 N FLOPs per token (forward 2N, backward to the activations 2N; N = parameters of all matrix multiplications, the
classifier included, the embedding lookup not) plus attention, 12 * layers * dim * seq_len per token (PaLM's count:
no causal discount); MFU = tokens/s * FLOPs per token / peak. Generation: greedy KV-cache decoding, base model and V1.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
from typing import Any, Callable

from benchmarks import harness

TRAIN_RUNS = {"v1": ("v1", False), "v1_ckpt": ("v1", True), "v2": ("v2", False), "v2_ckpt": ("v2", True)}
GEN_RUNS = ("base", "v1")
H100_SXM_BF16_DENSE_TFLOPS = 989.0
TINY = dict(vocab_size=256, dim=64, n_layers=4, n_heads=4, hidden_dim=128)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny, a smoke test)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and batch instead of LLaMA-7B")
    parser.add_argument("--model", default="llama-7b", help="a named config of lit_adapter.config")
    parser.add_argument("--batch_size", type=int, default=None, help="default 8 (tiny: 2)")
    parser.add_argument("--seq_len", type=int, default=None, help="default 512 (tiny: 32)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak_tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS,
                        help="the GPU's dense bf16 peak for MFU (H100 SXM: 989; H100 PCIe: 756)")
    parser.add_argument("--runs", type=harness.csv_list, default=list(TRAIN_RUNS),
                        help=f"training runs, subset of {list(TRAIN_RUNS)}")
    parser.add_argument("--gen_runs", type=harness.csv_list, default=list(GEN_RUNS), help=f"subset of {GEN_RUNS}")
    parser.add_argument("--gen_batch_sizes", type=harness.csv_list, default=["1", "8"])
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=None, help="default 128 (tiny: 8)")
    parser.add_argument("--gen_repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every block for training (as model.compile_blocks: true)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    tiny = args.tiny
    args.batch_size = args.batch_size or (2 if tiny else 8)
    args.seq_len = args.seq_len or (32 if tiny else 512)
    args.new_tokens = args.new_tokens or (8 if tiny else 128)
    unknown = [r for r in args.runs if r not in TRAIN_RUNS] + [r for r in args.gen_runs if r not in GEN_RUNS]
    if unknown:
        parser.error(f"unknown run: {unknown}")
    return args


class Device:
    """Synchronisation and memory probes of the device under test (CUDA memory, or the process RSS on CPU)."""

    def __init__(self, name: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def memory_gb(self) -> float:
        return self.torch.cuda.memory_allocated(self.device) / 2**30 if self.cuda else harness.rss_mb() / 1024

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)
        else:
            harness.reset_peak_rss()

    def peak_gb(self) -> float:
        return self.torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else harness.peak_rss_mb() / 1024

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def model_config(args: argparse.Namespace):
    from lit_adapter.config import ModelConfig

    max_len = max(args.seq_len, args.prompt_len + args.new_tokens)
    if args.tiny:
        return ModelConfig(name="tiny-bench", max_seq_len=max_len, **TINY)
    return ModelConfig.from_name(args.model, max_seq_len=max_len)


def adapter_config(variant: str, n_layers: int):
    from lit_adapter.adapters import AdapterConfig

    if variant == "v1":
        return AdapterConfig.v1(adapter_layers=max(n_layers - 2, 1))  # 30 of 32 layers on 7B
    return AdapterConfig.v2()


def flops_per_token(model: Any, config: Any, seq_len: int) -> float:
    """4 N + 12 * layers * dim * seq_len (see the module docstring)."""
    import torch.nn as nn

    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 4.0 * matmul_params + 12.0 * config.n_layers * config.dim * seq_len


def train_run(args: argparse.Namespace, name: str, device: Device) -> dict[str, Any]:
    import torch

    from benchmarks import training
    from lit_adapter.model import Block

    variant, checkpointing = TRAIN_RUNS[name]
    config = model_config(args)
    model, loss_fn, upcast = training.build_ours(config, adapter_config(variant, config.n_layers), torch.bfloat16,
                                                 device.device, [])
    flops = flops_per_token(model.llama, config, args.seq_len)  # before any wrapper renames the modules
    if checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(model.llama, check_fn=lambda module: isinstance(module, Block))
    if args.compile:
        for block in model.llama.layers:
            block.compile()
    model.train()
    batch = training.make_batch(config.vocab_size, args.batch_size, args.seq_len, device=device.device)
    model_gb = device.memory_gb()
    device.reset_peak()
    errors: list[str] = []
    step, first_loss = training.first_step(model, loss_fn, batch, upcast, torch.bfloat16, errors)
    harness.check_finite("loss", first_loss)
    times = training.time_steps(step, max(args.warmup - 1, 0), args.steps, device.sync)
    harness.check_finite("loss", times["losses"][-1])
    timing = training.timing_summary(times, args.batch_size * args.seq_len, 1)
    timing.pop("cpu_use")  # the host's share says nothing about a GPU run
    result = {
        "run": name, "variant": variant, "activation_checkpointing": checkpointing, "errors": errors,
        **training.trainable_summary(model), **timing, "flops_per_token": flops,
        "mfu": timing["tokens_per_s"] * flops / (args.peak_tflops * 1e12),
        "model_memory_gb": model_gb, "peak_memory_gb": device.peak_gb(), "last_loss": times["losses"][-1],
    }
    del model, loss_fn, step, batch
    device.free()
    return result


def generation_run(args: argparse.Namespace, name: str, device: Device) -> list[dict[str, Any]]:
    import torch

    from benchmarks import training
    from lit_adapter.adapters import AdapterConfig, attach_adapters
    config = model_config(args)
    adapter = adapter_config("v1", config.n_layers) if name == "v1" else AdapterConfig(adapter_layers=0)
    model = attach_adapters(training.random_base(config, torch.bfloat16, device.device), adapter).eval()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch_size in [int(b) for b in args.gen_batch_sizes]:
        prompts = torch.randint(3, config.vocab_size, (batch_size, args.prompt_len), generator=generator)
        generate = functools.partial(count_generated, model, prompts.to(device.device), args.new_tokens)
        generate()  # warm-up
        device.reset_peak()
        times, count = timed(generate, args.gen_repeats, device.sync)
        rows.append({"run": name, "batch": batch_size, "new_tokens": count, "seconds": harness.median(times),
                     "tokens_per_s": count / harness.median(times), "peak_memory_gb": device.peak_gb()})
    del model
    device.free()
    return rows


def count_generated(model: Any, prompts: Any, new_tokens: int) -> int:
    """Greedy decoding of every prompt row; the number of new tokens."""
    from lit_adapter.inference.generate import generate_batch, generate_tokens

    if prompts.shape[0] == 1:
        return len(list(generate_tokens(model, prompts[0], new_tokens)))
    return sum(len(row) for row in generate_batch(model, list(prompts), new_tokens))


def timed(fn: Callable[[], int], repeats: int, sync: Callable[[], None]) -> tuple[list[float], int]:
    times, count = [], 0
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        count = fn()
        sync()
        times.append(time.perf_counter() - start)
    return times, count


def machine(device: Device) -> dict[str, Any]:
    info = harness.machine_info()
    if device.cuda:
        info["gpu"] = device.torch.cuda.get_device_name(device.device)
    return info


TRAIN_COLUMNS: list[harness.Column] = [
    ("run", "run", str), ("trainable_params", "trainable", harness.fmt_number()),
    ("tokens_per_s", "tokens/s", harness.fmt_number()), ("mfu", "MFU", lambda v: f"{100 * v:.1f}%"),
    ("model_memory_gb", "model GiB", harness.fmt_number(2)), ("peak_memory_gb", "peak GiB", harness.fmt_number(2)),
]
GEN_COLUMNS: list[harness.Column] = [
    ("run", "run", str), ("batch", "batch", str), ("tokens_per_s", "new tokens/s", harness.fmt_number(1)),
    ("seconds", "s / generation", harness.fmt_number(2)), ("peak_memory_gb", "peak GiB", harness.fmt_number(2)),
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA GPU found; run it on a machine with one, or check the code path with "
              "`--device cpu --tiny`", file=sys.stderr)
        return 2
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    device = Device(args.device)
    torch.manual_seed(0)
    training_rows = []
    for name in args.runs:
        print(f"[gpu] training {name} ...", file=sys.stderr, flush=True)
        training_rows.append(train_run(args, name, device))
    generation_rows = []
    for name in args.gen_runs:
        print(f"[gpu] generation {name} ...", file=sys.stderr, flush=True)
        generation_rows += generation_run(args, name, device)
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    report = {"benchmark": "gpu", "machine": machine(device), "settings": settings,
              "model": model_config(args).to_dict(), "training": training_rows, "generation": generation_rows}
    print(harness.format_table(training_rows, TRAIN_COLUMNS))
    print()
    print(harness.format_table(generation_rows, GEN_COLUMNS))
    for row in training_rows:
        for message in row["errors"]:
            print(f"note: {row['run']}: {message}")
    if args.json:
        harness.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
