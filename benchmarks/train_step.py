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
import sys
import time
from typing import Any, Callable

from benchmarks import harness
from benchmarks.protos import PROTOS, masked_cross_entropy, ours_loss, patch_model_code

OURS, PEFT = "ours", "peft"
RUNS = {"v1": OURS, "peft_prompt": PEFT, "v2": OURS, "v2_lora": OURS, "peft_lora": PEFT}
PRECISIONS = ("fp32", "bf16")
# (ours, reference): the ratios the table reports
COMPARISONS = (
    ("v1", "peft_prompt"), ("v2", "v1"), ("v2_lora", "v1"), ("v2", "peft_lora"), ("v2_lora", "peft_lora"),
)
LORA_TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE_INDEX = -100
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
    parser.add_argument("--warmup", type=int, default=2, help="steps not timed")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child")
    parser.add_argument("--runs", type=harness.csv_list, default=list(RUNS), help=f"subset of {list(RUNS)}")
    parser.add_argument("--precisions", type=harness.csv_list, default=list(PRECISIONS))
    parser.add_argument("--proto", type=harness.csv_list, default=[],
                        help=f"prototype optimisations on our side, comma separated, from {sorted(PROTOS)}")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [r for r in args.runs if r not in RUNS] + [p for p in args.precisions if p not in PRECISIONS]
    unknown += [p for p in args.proto if p not in PROTOS]
    if unknown:
        parser.error(f"unknown run / precision / proto: {unknown}")
    return args


# ---- the child: one configuration ----


def make_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, Any]:
    """Random tokens; each row's first 1/8..1/2 (the "prompt") is excluded from the loss."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=generator)
    labels = input_ids.clone()
    prompt_lens = torch.randint(seq_len // 8, seq_len // 2 + 1, (batch_size,), generator=generator)
    for row, length in enumerate(prompt_lens.tolist()):
        labels[row, :length] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}


def ours_adapter_config(args: argparse.Namespace, run: str):
    from lit_adapter.adapters import AdapterConfig

    if run == "v1":
        return AdapterConfig.v1(adapter_len=args.adapter_len, adapter_layers=args.adapter_layers)
    lora = args.lora_rank if run == "v2_lora" else 0
    return AdapterConfig.v2(adapter_len=args.adapter_len, lora_rank=lora)


def build_ours(args: argparse.Namespace, run: str, dtype) -> tuple[Any, Callable, list]:
    """A random-init LLaMA built directly in `dtype` with the adapters of `run`; trainable parameters in float32.

    Returns (model, loss(input_ids, labels), the trainable parameters that were upcast from `dtype`)."""
    import torch

    patch_model_code(args.proto)

    from lit_adapter.adapters import build_adapter_model
    from lit_adapter.checkpoint import meta_model

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        base = meta_model(harness.model_config(args, args.seq_len))
    finally:
        torch.set_default_dtype(previous)
    base.to_empty(device="cpu")
    base.reset_parameters()
    model = build_adapter_model(base, ours_adapter_config(args, run))
    upcast = [p for p in model.parameters() if p.requires_grad and p.dtype != torch.float32]
    for param in upcast:
        param.data = param.data.float()
    return model, ours_loss(model, args.proto), upcast


def build_peft(args: argparse.Namespace, run: str, dtype) -> tuple[Any, Callable, list]:
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

    def loss(input_ids, labels):
        return masked_cross_entropy(model(input_ids=input_ids, use_cache=False).logits, labels)

    return model, loss, []


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    harness.set_threads(args.threads)
    torch.manual_seed(0)
    side, dtype = RUNS[args.run], {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    build = build_ours if side == OURS else build_peft
    model, loss_fn, upcast = build(args, args.run, dtype)
    model.train()
    rss_model = harness.rss_mb()
    batch = make_batch(args.vocab_size, args.batch_size, args.seq_len)
    result: dict[str, Any] = {"run": args.run, "side": side, "precision": args.precision, "errors": [],
                              "proto": args.proto if side == OURS else []}

    def make_step() -> Callable[[], float]:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.02)

        def step() -> float:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(batch["input_ids"], batch["labels"])
            loss.backward()
            optimizer.step()
            return float(loss)

        return step

    harness.reset_peak_rss()
    step = make_step()
    try:
        first_loss = step()
    except RuntimeError as err:
        if not upcast:
            raise
        # float32 trainable norms in a bf16 model: report, then train those norms in bf16 (the training module's mode)
        result["errors"].append(f"fp32 trainable parameters in a bf16 base: {type(err).__name__}: {err}")
        for param in upcast:
            param.data = param.data.to(dtype)
        upcast = []
        step = make_step()
        first_loss = step()
    harness.check_finite("loss", first_loss)
    times, losses = [], [first_loss]
    for index in range(args.warmup - 1 + args.steps):
        start = time.perf_counter()
        losses.append(step())
        if index >= args.warmup - 1:
            times.append(time.perf_counter() - start)
    harness.check_finite("loss", losses[-1])
    tokens = args.batch_size * args.seq_len
    trainable = [p for p in model.parameters() if p.requires_grad]
    result.update(
        trainable_params=sum(p.numel() for p in trainable),
        trainable_dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in trainable}),
        step_s=harness.median(times),
        step_s_all=[round(t, 4) for t in times],
        tokens_per_s=tokens / harness.median(times),
        rss_model_mb=rss_model,
        peak_rss_mb=harness.peak_rss_mb(),
        first_loss=first_loss,
        last_loss=losses[-1],
    )
    return result


# ---- the parent: every configuration, the table ----


def compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(r["run"], r["precision"]): r for r in results if "error" not in r}
    rows = []
    for precision in PRECISIONS:
        for ours, reference in COMPARISONS:
            a, b = by_key.get((ours, precision)), by_key.get((reference, precision))
            if a is None or b is None:
                continue
            rows.append({
                "pair": f"{ours} / {reference}", "precision": precision,
                "speed_ratio": harness.ratio(a["tokens_per_s"], b["tokens_per_s"]),
                "peak_rss_ratio": harness.ratio(a["peak_rss_mb"], b["peak_rss_mb"]),
            })
    return rows


RESULT_COLUMNS: list[harness.Column] = [
    ("run", "run", str), ("precision", "precision", str), ("trainable_params", "trainable", harness.fmt_number()),
    ("tokens_per_s", "tokens/s (median)", harness.fmt_number()), ("step_s", "step s", harness.fmt_number(3)),
    ("peak_rss_mb", "peak RSS MiB", harness.fmt_number()), ("rss_model_mb", "RSS after build MiB",
                                                           harness.fmt_number()),
]
RATIO_COLUMNS: list[harness.Column] = [
    ("pair", "ours / reference", str), ("precision", "precision", str),
    ("speed_ratio", "tokens/s ratio", harness.fmt_ratio), ("peak_rss_ratio", "peak RSS ratio", harness.fmt_ratio),
]


def parent(args: argparse.Namespace) -> dict[str, Any]:
    machine = harness.machine_info()
    results = []
    for precision in args.precisions:
        for run in args.runs:
            print(f"[train_step] {run} {precision} ...", file=sys.stderr, flush=True)
            flags = ["--child", "--run", run, "--precision", precision, *harness.child_args(args, CHILD_FLAGS)]
            result = harness.run_child("benchmarks.train_step", flags)
            result.setdefault("run", run)
            result.setdefault("precision", precision)
            results.append(result)
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report = {
        "benchmark": "train_step",
        "machine": machine,
        "settings": {name: getattr(args, name) for name in CHILD_FLAGS},
        "results": results,
        "ratios": compare(results),
    }
    print(harness.format_table([r for r in results if "error" not in r], RESULT_COLUMNS))
    print()
    print(harness.format_table(report["ratios"], RATIO_COLUMNS))
    for r in results:
        for message in ([r["error"]] if "error" in r else []) + r.get("errors", []):
            print(f"note: {r['run']} {r['precision']}: {message}")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load average before {machine['load_average']} "
          f"after {machine['load_average_after']}")
    if args.json:
        harness.write_json(args.json, report)
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        harness.emit(child(args))
    else:
        parent(args)


if __name__ == "__main__":
    main()
