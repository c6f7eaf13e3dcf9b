"""Greedy KV-cache generation throughput on CPU: lit-adapter vs transformers `generate` (+ PEFT adaption prompt).

Both sides load the same random weights (written once by the parent as our checkpoint folder and, converted with
lit_adapter.convert.hf, as a Hugging Face folder), decode the same random prompts greedily, and each configuration
runs in its own process:

    python -m benchmarks.generate                        # base model and V1 adapter, fp32 and bf16, batch 1 and 8
    python -m benchmarks.generate --runs ours,hf --precisions bf16 --batch_sizes 1 --json out.json

Runs: ours / hf (the base model), ours_v1 / peft_v1 (a V1 adapter on the top `--adapter_layers` layers, the same
prompts and gates on both sides: PEFT's gate is used raw, so ours uses gate_activation "identity").
tokens/s = batch * new tokens / wall time of one whole generation (prefill included).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import harness

OURS, HF = "ours", "hf"
RUNS = {"ours": (OURS, False), "hf": (HF, False), "ours_v1": (OURS, True), "peft_v1": (HF, True)}
COMPARISONS = (("ours", "hf"), ("ours_v1", "peft_v1"))
PRECISIONS = ("fp32", "bf16")
GATE_VALUE = 0.1  # a non-zero gate, so the adapter changes the output
CHILD_FLAGS = (
    "vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "prompt_len", "new_tokens", "batch_sizes",
    "adapter_len", "adapter_layers", "warmup", "repeats", "threads",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_args(parser)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--batch_sizes", type=harness.csv_list, default=["1", "8"])
    parser.add_argument("--adapter_len", type=int, default=10)
    parser.add_argument("--adapter_layers", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1, help="untimed generations per batch size")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per batch size (median)")
    parser.add_argument("--threads", type=int, default=2)
    harness.add_comparison_args(parser, RUNS, PRECISIONS)
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--repeats and --rounds must be at least 1, --warmup at least 0")
    harness.check_choices(parser, args, RUNS, PRECISIONS)
    return args


def max_seq_len(args: argparse.Namespace) -> int:
    return args.prompt_len + args.new_tokens


# ---- the weights both sides load ----


def write_weights(args: argparse.Namespace, folder: Path) -> None:
    """A random-init model as our checkpoint folder (`folder/ours`) and as a Hugging Face folder (`folder/hf`)."""
    import json

    import torch

    from lit_adapter.checkpoint import save_checkpoint, save_tensors
    from lit_adapter.convert.hf import hf_config_dict, to_hf_state_dict
    from lit_adapter.model import LLaMA

    config = harness.model_config(args, max_seq_len(args))
    torch.manual_seed(0)
    model = LLaMA(config)
    model.reset_parameters()
    state = model.state_dict()
    save_checkpoint(folder / "ours", state, config, tokenizer=None)
    (folder / "hf").mkdir(parents=True, exist_ok=True)
    save_tensors(to_hf_state_dict(state, config), folder / "hf" / "model.safetensors", metadata={"format": "pt"})
    (folder / "hf" / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))


def adapter_values(args: argparse.Namespace, layer: int):
    """The prompt [adapter_len, dim] of one adapted layer, the same on both sides."""
    import torch

    generator = torch.Generator().manual_seed(1000 + layer)
    return torch.randn(args.adapter_len, args.dim, generator=generator)


def make_prompts(args: argparse.Namespace, batch_size: int):
    import torch

    generator = torch.Generator().manual_seed(batch_size)
    return torch.randint(3, args.vocab_size, (batch_size, args.prompt_len), generator=generator)


# ---- the child: one side, one precision, every batch size ----


Generate = Callable[[Any], list[list[int]]]


def build_ours(args: argparse.Namespace, adapter: bool, dtype) -> Generate:
    import torch

    from lit_adapter.adapters import AdapterConfig, attach_adapters
    from lit_adapter.checkpoint import load_model
    from lit_adapter.inference.cpu import CPUDecoding
    from lit_adapter.inference.generate import generate_batch, generate_tokens

    base = load_model(Path(args.weights) / "ours", dtype=dtype)
    layers = args.adapter_layers if adapter else 0
    model = attach_adapters(base, AdapterConfig.v1(adapter_len=args.adapter_len, adapter_layers=layers,
                                                   gate_activation="identity"))
    first = args.n_layers - layers
    with torch.no_grad():
        for index in range(first, args.n_layers):
            prompt = model.llama.layers[index].attention.adaption_prompt
            prompt.prompt.copy_(adapter_values(args, index))
            prompt.gate.fill_(GATE_VALUE)
    model.eval()
    cpu = CPUDecoding.for_model(model)  # as Engine.load does: settings measured on this machine
    cpu.prepare(model)

    def generate(prompts) -> list[list[int]]:
        with cpu:
            if prompts.shape[0] == 1:
                return [list(generate_tokens(model, prompts[0], args.new_tokens))]
            return generate_batch(model, list(prompts), args.new_tokens)

    generate.settings = repr(cpu)  # type: ignore[attr-defined]  (what the probes chose, for the report)
    return generate


def build_hf(args: argparse.Namespace, adapter: bool, dtype) -> Generate:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(args.weights) / "hf", dtype=dtype)
    if adapter:
        from peft import AdaptionPromptConfig, get_peft_model

        config = AdaptionPromptConfig(adapter_len=args.adapter_len, adapter_layers=args.adapter_layers,
                                      task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("adaption_prompt"):
                    layer = int(name.split("layers.")[1].split(".")[0])
                    param.copy_(adapter_values(args, layer)[None])
                elif name.endswith("adaption_gate"):
                    param.fill_(GATE_VALUE)
    model.eval()
    model.generation_config.eos_token_id = None  # always decode new_tokens tokens, as ours does without eos_id

    def generate(prompts) -> list[list[int]]:
        with torch.inference_mode():
            out = model.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                do_sample=False, use_cache=True, pad_token_id=0,
            )
        return out[:, prompts.shape[1]:].tolist()

    return generate


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    side, adapter = RUNS[args.run]
    harness.set_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    generate = (build_ours if side == OURS else build_hf)(args, adapter, dtype)
    result: dict[str, Any] = {"run": args.run, "side": side, "precision": args.precision,
                              "rss_model_mb": harness.rss_mb(),
                              "cpu_decoding": getattr(generate, "settings", None), "batches": {}}
    for batch_size in [int(b) for b in args.batch_sizes]:
        prompts = make_prompts(args, batch_size)
        for _ in range(args.warmup):
            generate(prompts)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            tokens = generate(prompts)
            times.append(time.perf_counter() - start)
        new_tokens = sum(len(row) for row in tokens)
        result["batches"][str(batch_size)] = {
            "seconds": harness.median(times), "seconds_all": [round(t, 4) for t in times],
            "new_tokens": new_tokens, "tokens_per_s": new_tokens / harness.median(times),
            "tokens_per_s_best": new_tokens / min(times), "tokens": tokens,
        }
    result["peak_rss_mb"] = harness.peak_rss_mb()
    if side == OURS:  # the attention path the probe chose per shape class, beside the CPU decoding settings
        from lit_adapter.ops import ATTENTION_PATHS

        result["attention_paths"] = {repr(key): path for key, path in ATTENTION_PATHS.choices.items()}
    return result


# ---- the parent ----


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each row's tokens before the first difference (1.0 = identical greedy output)."""
    fractions = []
    for row_a, row_b in zip(a, b, strict=True):
        pairs = enumerate(zip(row_a, row_b, strict=False))
        same = next((i for i, (x, y) in pairs if x != y), min(len(row_a), len(row_b)))
        fractions.append(same / max(len(row_a), len(row_b), 1))
    return sum(fractions) / max(len(fractions), 1)


def rows_and_ratios(results: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    rows = []
    for r in results:
        for batch, b in r.get("batches", {}).items():
            rows.append({"run": r["run"], "precision": r["precision"], "batch": batch,
                         "tokens_per_s": b["tokens_per_s"], "tokens_per_s_best": b["tokens_per_s_best"],
                         "seconds": b["seconds"], "peak_rss_mb": r["peak_rss_mb"],
                         "cpu_busy_before": b.get("cpu_busy_before", r.get("cpu_busy_before"))})
    ratios = []
    for precision, ours, peer, a, b in harness.comparison_pairs(results, COMPARISONS, PRECISIONS,
                                                               usable=lambda r: "batches" in r):
        for batch in [batch for batch in a["batches"] if batch in b["batches"]]:
            x, y = a["batches"][batch], b["batches"][batch]
            ratios.append({"pair": f"{ours} / {peer}", "precision": precision, "batch": batch,
                           "speed_ratio": harness.ratio(x["tokens_per_s"], y["tokens_per_s"]),
                           "speed_ratio_best": harness.ratio(x["tokens_per_s_best"], y["tokens_per_s_best"]),
                           "greedy_agreement": agreement(x["tokens"], y["tokens"])})
    return rows, ratios


RESULT_COLUMNS: list[harness.Column] = [
    ("run", "run", str), ("precision", "precision", str), ("batch", "batch", str),
    ("tokens_per_s", "new tokens/s (median)", harness.fmt_number(1)),
    ("tokens_per_s_best", "new tokens/s (best)", harness.fmt_number(1)),
    ("seconds", "s / generation", harness.fmt_number(2)), ("peak_rss_mb", "peak RSS MiB", harness.fmt_number()),
    ("cpu_busy_before", "busy before", harness.fmt_percent),
]
RATIO_COLUMNS: list[harness.Column] = [
    ("pair", "ours / reference", str), ("precision", "precision", str), ("batch", "batch", str),
    ("speed_ratio", "tokens/s ratio (median)", harness.fmt_ratio),
    ("speed_ratio_best", "tokens/s ratio (best)", harness.fmt_ratio),
    ("greedy_agreement", "same greedy tokens", lambda v: f"{100 * v:.0f}%"),
]


def pool_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several rounds of the same configuration: per batch size, the least disturbed round (lowest
    median time), with every round's median and the highest peak RSS."""
    good = [r for r in rounds if "error" not in r]
    if not good:
        return rounds[0]
    pooled = dict(good[0], rounds=len(good), peak_rss_mb=max(r["peak_rss_mb"] for r in good), batches={})
    for batch in good[0]["batches"]:
        best = min(good, key=lambda r: r["batches"][batch]["seconds"])
        pooled["batches"][batch] = dict(best["batches"][batch],
                                        seconds_rounds=[r["batches"][batch]["seconds"] for r in good],
                                        cpu_busy_before=best["cpu_busy_before"])
    return pooled


def parent(args: argparse.Namespace) -> dict[str, Any]:
    machine = harness.machine_info()
    with tempfile.TemporaryDirectory(prefix="lit-adapter-bench-") as folder:
        write_weights(args, Path(folder))
        rounds = harness.run_rounds("benchmarks.generate", args, CHILD_FLAGS, extra=["--weights", folder])
    results = [pool_rounds(rs) for rs in rounds.values()]
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    rows, ratios = rows_and_ratios(results)
    report = {"benchmark": "generate", "machine": machine,
              "settings": {name: getattr(args, name) for name in (*CHILD_FLAGS, "rounds", "wait_idle")},
              "results": results, "rows": rows, "ratios": ratios}
    harness.print_report(report, rows, ratios, RESULT_COLUMNS, RATIO_COLUMNS, args.json)
    return report


def main(argv: list[str] | None = None) -> None:
    harness.main(argv, parse_args, child, parent)


if __name__ == "__main__":
    main()
