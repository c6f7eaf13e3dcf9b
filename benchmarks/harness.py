"""What every benchmark shares: one child process per measured configuration, memory probes, tables, JSON.

A benchmark script runs in two roles. The parent parses the user's flags, starts one child process per
configuration (`python -m benchmarks.<name> --child ...`), and prints the table. A child measures one configuration
and prints one line `BENCH_RESULT {json}` as its last output. Separate processes keep each side's imports, allocator
state and peak memory apart.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

RESULT_PREFIX = "BENCH_RESULT "
REPO_ROOT = Path(__file__).resolve().parents[1]

# The benchmark LLaMA: a small LLaMA shape that two CPU cores train in seconds per step.
MODEL_DEFAULTS = dict(vocab_size=32000, dim=512, n_layers=8, n_heads=8, hidden_dim=1376)


def add_model_args(parser: argparse.ArgumentParser, **defaults: int) -> None:
    values = {**MODEL_DEFAULTS, **defaults}
    group = parser.add_argument_group("model (random init)")
    for name, value in values.items():
        group.add_argument(f"--{name}", type=int, default=value)


def model_config(args: argparse.Namespace, max_seq_len: int):
    from lit_adapter.config import ModelConfig

    return ModelConfig(
        name="bench", vocab_size=args.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
        hidden_dim=args.hidden_dim, norm_eps=1e-5, max_seq_len=max_seq_len,
    )


def hf_config(args: argparse.Namespace, max_seq_len: int):
    """The transformers LlamaConfig of the same architecture (via our converter's config.json)."""
    from transformers import LlamaConfig

    from lit_adapter.convert.hf import hf_config_dict

    data = hf_config_dict(model_config(args, max_seq_len))
    data.pop("architectures")
    data.pop("model_type")
    return LlamaConfig(**data)


# ---- memory ----


def rss_mb() -> float:
    """Resident set size now, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process (getrusage; since the last `reset_peak_rss`), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux /proc/self/clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- timing ----


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of all CPUs busy over the next `interval` seconds (NaN where /proc/stat is unreadable)."""
    import time

    try:
        busy0, total0 = _cpu_ticks()
        time.sleep(interval)
        busy1, total1 = _cpu_ticks()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_until_idle(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (at most `max_wait` seconds) until other processes use under `threshold` of the CPUs; the last reading."""
    import time

    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy(2.0)
    return busy


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(ours: Optional[float], peer: Optional[float]) -> Optional[float]:
    if ours is None or peer is None or not peer or not math.isfinite(ours) or not math.isfinite(peer):
        return None
    return ours / peer


# ---- the child processes ----


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def emit(result: dict[str, Any]) -> None:
    """The child's answer to its parent: one JSON line, last on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(module: str, args: Sequence[str], timeout: float = 3600, wait_idle: float = 0) -> dict[str, Any]:
    """Run `python -m module args` from the repository root; its result, or {"error": ...} naming what failed.

    With `wait_idle` > 0, first wait up to that many seconds for the other processes to leave the CPUs alone; the
    result records how busy the machine was just before the child started (`cpu_busy_before`)."""
    busy = wait_until_idle(wait_idle) if wait_idle > 0 else cpu_busy(0.5)
    result = _run(module, args, timeout)
    result["cpu_busy_before"] = busy
    return result


def _run(module: str, args: Sequence[str], timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", module, *args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    try:
        proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s: {' '.join(command)}"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"error": f"exit {proc.returncode}: {tail}"}


def run_rounds(module: str, args: argparse.Namespace, child_flags: Sequence[str],
               extra: Sequence[str] = ()) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every (run, precision) of `args` in its own child process, `args.rounds` times interleaved (so that a
    disturbed minute hits one round of each, not every round of one): the results per configuration."""
    configurations = [(run, precision) for precision in args.precisions for run in args.runs]
    rounds: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in configurations}
    name = module.rsplit(".", 1)[-1]
    for index in range(args.rounds):
        for run, precision in configurations:
            print(f"[{name}] round {index + 1}/{args.rounds}: {run} {precision} ...", file=sys.stderr, flush=True)
            flags = ["--child", "--run", run, "--precision", precision, *extra, *child_args(args, child_flags)]
            result = run_child(module, flags, wait_idle=args.wait_idle)
            result.setdefault("run", run)
            result.setdefault("precision", precision)
            rounds[(run, precision)].append(result)
    return rounds


def child_args(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """Re-create the flags `names` of the parsed arguments for a child process."""
    out = []
    for name in names:
        value = getattr(args, name)
        if isinstance(value, bool):
            out += [f"--{name}"] if value else []
        elif value is not None:
            out += [f"--{name}", ",".join(value) if isinstance(value, list) else str(value)]
    return out


def add_comparison_args(parser: argparse.ArgumentParser, runs, precisions, protos=None) -> None:
    """The options every side-by-side benchmark shares: which runs, precisions and (if it has any) prototypes,
    repeated rounds, idle waiting, JSON output, and the hidden ones a child process is started with."""
    parser.add_argument("--runs", type=csv_list, default=list(runs), help=f"subset of {list(runs)}")
    parser.add_argument("--precisions", type=csv_list, default=list(precisions))
    if protos:
        parser.add_argument("--proto", type=csv_list, default=[],
                            help=f"prototype optimisations on our side, comma separated, from {sorted(protos)}")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every configuration this many times, interleaved; the least disturbed round counts")
    add_run_args(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default=None, help=argparse.SUPPRESS)


def check_choices(parser: argparse.ArgumentParser, args: argparse.Namespace, runs, precisions, protos=None) -> None:
    unknown = [r for r in args.runs if r not in runs] + [p for p in args.precisions if p not in precisions]
    unknown += [p for p in getattr(args, "proto", []) if p not in (protos or {})]
    if unknown:
        parser.error(f"unknown run / precision / proto: {unknown}")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait_idle", type=float, default=0,
                        help="before each child, wait up to this many seconds for the CPUs to be idle (noisy machines)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


# ---- reporting ----


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def package_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Where the figures come from: CPU model, cores, load average, library versions."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
    }


Column = tuple[str, str, Callable[[Any], str]]


def fmt_number(digits: int = 0) -> Callable[[Any], str]:
    def fmt(value: Any) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        return f"{value:,.{digits}f}"

    return fmt


def fmt_percent(value: Any) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.0f}%"


def fmt_ratio(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub-markdown table of `rows` with the given (key, header, formatter) columns."""
    cells = [[header for _, header, _ in columns]]
    cells += [[fmt(row.get(key)) if not isinstance(row.get(key), str) else row[key] for key, _, fmt in columns]
              for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    from lit_adapter.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"{name} is {value}")


def print_report(report: dict[str, Any], rows: Sequence[dict[str, Any]], ratios: Sequence[dict[str, Any]],
                 result_columns: Sequence[Column], ratio_columns: Sequence[Column], json_path: Optional[str]) -> None:
    """The two markdown tables, a note per failed child, the machine line; `report` as JSON to `json_path`."""
    print(format_table(rows, result_columns))
    print()
    print(format_table(ratios, ratio_columns))
    for r in report["results"]:
        for message in ([r["error"]] if "error" in r else []) + r.get("errors", []):
            print(f"note: {r['run']} {r['precision']}: {message}")
    machine = report["machine"]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load average before {machine['load_average']} "
          f"after {machine['load_average_after']}")
    if json_path:
        write_json(json_path, report)


def main(argv: Optional[list[str]], parse_args: Callable, child: Callable, parent: Callable) -> None:
    """A benchmark script's entry: `--child` runs one configuration and emits its result, otherwise the parent."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        emit(child(args))
    else:
        parent(args)


def comparison_pairs(results: Sequence[dict[str, Any]], comparisons: Sequence[tuple[str, str]],
                     precisions: Sequence[str], usable: Callable[[dict[str, Any]], bool]):
    """(precision, ours, peer, our result, peer's result) for every comparison both sides of which ran."""
    by_key = {(r["run"], r["precision"]): r for r in results if usable(r)}
    for precision in precisions:
        for ours, peer in comparisons:
            a, b = by_key.get((ours, precision)), by_key.get((peer, precision))
            if a is not None and b is not None:
                yield precision, ours, peer, a, b
