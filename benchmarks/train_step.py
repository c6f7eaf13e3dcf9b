"""Adapter training-step throughput and peak memory on CPU: lit-adapter V1/V2 vs transformers + PEFT.

One training step = forward + masked cross-entropy (prompt tokens carry no loss) + backward + AdamW step, on the
same random batches for every configuration, each configuration in its own process:

    python -m benchmarks.train_step                      # the full table (several minutes on 2 cores)
    python -m benchmarks.train_step --json out.json --runs v1,peft_prompt --precisions fp32

Runs: v1 (adapter_len 10 on the top 6 layers) vs peft_prompt (PEFT AdaptionPromptConfig, same sizes); v2 (paper:
bias/scale on every linear, norms trained, prompts on all layers but the first), v2_lora (v2 + LoRA rank 16 on all
seven linears) vs peft_lora (PEFT LoRA rank 16 on q,k,v,o,gate,up,down). Precisions: fp32 everywhere; bf16 = each
side's best low-precision mode (ours: bf16 frozen base, fp32 trainable parameters; PEFT: everything bf16, the only
mode its adapters run in).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

from benchmarks import harness
from benchmarks.protos import PROTOS

OURS, PEFT = "ours", "peft"
RUNS = {"v1": OURS, "peft_prompt": PEFT, "v2": OURS, "v2_lora": OURS, "peft_lora": PEFT}
PRECISIONS = ("fp32", "bf16")
# (ours, reference): the ratios the table reports
COMPARISONS = (
    ("v1", "peft_prompt"), ("v2", "v1"), ("v2_lora", "v1"), ("v2", "peft_lora"), ("v2_lora", "peft_lora"),
)
LORA_TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHILD_FLAGS = (
    "vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "seq_len", "batch_size", "adapter_len",
    "adapter_layers", "lora_rank", "warmup", "steps", "threads", "proto",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_args(parser)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--adapter_len", type=int, default=10)
    parser.add_argument("--adapter_layers", type=int, default=6, help="V1 / PEFT adaption prompt: the top L layers")
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first builds the optimizer state)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child")
    harness.add_comparison_args(parser, RUNS, PRECISIONS, PROTOS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be at least 1")
    harness.check_choices(parser, args, RUNS, PRECISIONS, PROTOS)
    return args


# ---- the child: one configuration ----


def ours_adapter_config(args: argparse.Namespace, run: str):
    from lit_adapter.adapters import AdapterConfig

    if run == "v1":
        return AdapterConfig.v1(adapter_len=args.adapter_len, adapter_layers=args.adapter_layers)
    lora = args.lora_rank if run == "v2_lora" else 0
    return AdapterConfig.v2(adapter_len=args.adapter_len, lora_rank=lora)


def build_peft(args: argparse.Namespace, run: str, dtype) -> tuple[Any, Callable]:
    """The transformers model with PEFT's adapters, everything in `dtype`; (model, loss(input_ids, labels))."""
    from peft import AdaptionPromptConfig, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_config(harness.hf_config(args, args.seq_len), dtype=dtype)
    if run == "peft_prompt":
        config = AdaptionPromptConfig(
            adapter_len=args.adapter_len, adapter_layers=args.adapter_layers, task_type="CAUSAL_LM"
        )
    else:  # alpha = rank: scaling 1, as our LoRA without alpha
        config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, lora_dropout=0.0,
                            target_modules=LORA_TARGETS_HF, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    from benchmarks.training import mean_cross_entropy

    def loss(input_ids, labels):
        return mean_cross_entropy(model(input_ids=input_ids, use_cache=False).logits, labels)

    return model, loss


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks import training

    harness.set_threads(args.threads)
    torch.manual_seed(0)
    side, dtype = RUNS[args.run], {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    if side == OURS:
        config = harness.model_config(args, args.seq_len)
        model, loss_fn, upcast = training.build_ours(config, ours_adapter_config(args, args.run), dtype, "cpu",
                                                     args.proto)
    else:
        (model, loss_fn), upcast = build_peft(args, args.run, dtype), []
    model.train()
    rss_model = harness.rss_mb()
    batch = training.make_batch(args.vocab_size, args.batch_size, args.seq_len)
    errors: list[str] = []
    harness.reset_peak_rss()
    step, first_loss = training.first_step(model, loss_fn, batch, upcast, dtype, errors)
    harness.check_finite("loss", first_loss)
    times = training.time_steps(step, max(args.warmup - 1, 0), args.steps)
    harness.check_finite("loss", times["losses"][-1])
    return {
        "run": args.run, "side": side, "precision": args.precision, "errors": errors,
        "proto": args.proto if side == OURS else [],
        **training.trainable_summary(model),
        **training.timing_summary(times, args.batch_size * args.seq_len, args.threads),
        "rss_model_mb": rss_model,
        "peak_rss_mb": harness.peak_rss_mb(),
        "first_loss": first_loss,
        "last_loss": times["losses"][-1],
    }


# ---- the parent: every configuration, the table ----


def pool_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several rounds of the same configuration: the least disturbed round (lowest median step
    time: other processes only ever slow a round down), with every round's median and the highest peak RSS."""
    good = [r for r in rounds if "error" not in r]
    if not good:
        return rounds[0]
    best = dict(min(good, key=lambda r: r["step_s"]))
    best.update(rounds=len(good), step_s_rounds=[r["step_s"] for r in good],
                peak_rss_mb=max(r["peak_rss_mb"] for r in good))
    return best


def compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "pair": f"{ours} / {reference}", "precision": precision,
            "speed_ratio": harness.ratio(a["tokens_per_s"], b["tokens_per_s"]),
            "speed_ratio_best": harness.ratio(a["tokens_per_s_best"], b["tokens_per_s_best"]),
            "peak_rss_ratio": harness.ratio(a["peak_rss_mb"], b["peak_rss_mb"]),
        }
        for precision, ours, reference, a, b in harness.comparison_pairs(
            results, COMPARISONS, PRECISIONS, usable=lambda r: "error" not in r)
    ]


RESULT_COLUMNS: list[harness.Column] = [
    ("run", "run", str), ("precision", "precision", str), ("trainable_params", "trainable", harness.fmt_number()),
    ("tokens_per_s", "tokens/s (median)", harness.fmt_number()),
    ("tokens_per_s_best", "tokens/s (best)", harness.fmt_number()),
    ("peak_rss_mb", "peak RSS MiB", harness.fmt_number()), ("rss_model_mb", "RSS after build MiB",
                                                           harness.fmt_number()),
    ("cpu_use", "CPU share", harness.fmt_percent), ("cpu_busy_before", "busy before", harness.fmt_percent),
]
RATIO_COLUMNS: list[harness.Column] = [
    ("pair", "ours / reference", str), ("precision", "precision", str),
    ("speed_ratio", "tokens/s ratio (median)", harness.fmt_ratio),
    ("speed_ratio_best", "tokens/s ratio (best)", harness.fmt_ratio),
    ("peak_rss_ratio", "peak RSS ratio", harness.fmt_ratio),
]


def parent(args: argparse.Namespace) -> dict[str, Any]:
    machine = harness.machine_info()
    rounds = harness.run_rounds("benchmarks.train_step", args, CHILD_FLAGS)
    results = [pool_rounds(rs) for rs in rounds.values()]
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report = {
        "benchmark": "train_step",
        "machine": machine,
        "settings": {name: getattr(args, name) for name in (*CHILD_FLAGS, "rounds", "wait_idle")},
        "results": results,
        "ratios": compare(results),
    }
    rows = [r for r in results if "error" not in r]
    harness.print_report(report, rows, report["ratios"], RESULT_COLUMNS, RATIO_COLUMNS, args.json)
    return report


def main(argv: list[str] | None = None) -> None:
    harness.main(argv, parse_args, child, parent)


if __name__ == "__main__":
    main()
