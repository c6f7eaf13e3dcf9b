"""`lit-adapter eval BENCHMARK ...`: benchmark evaluations (ScienceQA)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Literal, Optional

from lit_adapter.errors import LitAdapterError
from lit_adapter.evaluation.results import (
    METRICS_FILE,
    PredictionLog,
    check_settings,
    prediction_record,
    read_json,
    write_json,
)
from lit_adapter.evaluation.scienceqa import ScienceQAScorer, parse_answer
from lit_adapter.inference.engine import Precision

Split = Literal["test", "val", "minival", "minitest", "train"]
Mode = Literal["generate", "likelihood"]


def scienceqa(
    data_dir: Path,
    split: Split = "test",
    checkpoint_dir: Optional[Path] = None,
    adapter: Optional[Path] = None,
    captions: Optional[Path] = None,
    images: Optional[Path] = None,
    limit: Optional[int] = None,
    batch_size: int = 8,
    output: Optional[Path] = None,
    mode: Mode = "generate",
    outputs_file: Optional[Path] = None,
    max_new_tokens: int = 32,
    prompt_style: Optional[str] = None,
    precision: Precision = "auto",
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate on ScienceQA: accuracy overall and by subject (NAT SOC LAN), context (TXT IMG NO) and grade.

    Prints the paper's table and writes `metrics.json` and `predictions.jsonl` to --output. A run stopped midway
    resumes where it stopped when started again with the same --output. The model is loaded and decodes as in
    `lit-adapter generate` (the same engine: bias/scale and LoRA folded, same device and precision), so generate
    mode gives the answers `generate` gives for the same prompts.

    Args:
        data_dir: the ScienceQA folder with `problems.json` and `pid_splits.json`.
        split: which problems: test, val, minival, minitest (or train).
        checkpoint_dir: the base model folder (from `lit-adapter convert`); not needed with --outputs_file.
        adapter: an adapter file or folder (`adapter.safetensors` + `adapter_config.yaml`, or an official one);
            without it the base model answers.
        captions: a captions JSON (`{"captions": {pid: text}}`, as in the official release) added to the context.
        images: the problem images: the official `images` folder (`<split>/<pid>/image.png`) or one split's
            folder (`<pid>/image.png`); needs an adapter with a visual encoder.
        limit: evaluate only the first N problems of the split.
        batch_size: problems answered together.
        output: the folder for `predictions.jsonl` and `metrics.json` (default out/eval/scienceqa_<split>_<mode>).
        mode: generate (greedy decoding, then the answer is read from the text) or likelihood (the option whose
            "The answer is (X)." is most likely after the prompt; always readable, faster).
        outputs_file: score existing outputs instead of running a model: a JSON map pid -> generated text (or
            the official results file with an "outputs" map).
        max_new_tokens: the most tokens generated per answer.
        prompt_style: the prompt template; default: the adapter's (alpaca without an adapter).
        precision: 32-true, bf16-true or 16-true; auto = bf16-true on a GPU that supports it, else 32-true.
        device: cpu, cuda, cuda:1, ... or auto.
    """
    from lit_adapter.data.scienceqa import load_problems

    if limit is not None and limit < 1:
        raise LitAdapterError(f"--limit must be at least 1 (got {limit})")
    if batch_size < 1:
        raise LitAdapterError(f"--batch_size must be at least 1 (got {batch_size})")
    if not Path(data_dir).is_dir():
        raise LitAdapterError(f"{data_dir}: ScienceQA folder not found (it holds problems.json and pid_splits.json)")
    problems = load_problems(data_dir, split)[:limit]
    if outputs_file is not None:
        output = output or Path("out") / "eval" / f"scienceqa_{split}_outputs"
        records = records_from_outputs(outputs_file, problems)
        settings = {"split": split, "outputs_file": _str(outputs_file)}
        check_settings(output, settings)  # never overwrite a model run's predictions
        PredictionLog(output).rewrite(records)
    else:
        if checkpoint_dir is None:
            raise LitAdapterError("--checkpoint_dir is required (or score existing outputs with --outputs_file)")
        from lit_adapter.evaluation.run import predict_all

        output = output or Path("out") / "eval" / f"scienceqa_{split}_{mode}"
        settings = {
            "split": split, "mode": mode, "checkpoint_dir": _str(checkpoint_dir), "adapter": _str(adapter),
            "captions": _str(captions), "images": _str(images), "prompt_style": prompt_style,
            "max_new_tokens": max_new_tokens if mode == "generate" else None,
        }
        check_settings(output, settings)
        records = predict_all(
            problems, PredictionLog(output), checkpoint_dir, adapter, captions, images, batch_size, mode,
            max_new_tokens, prompt_style, precision, device,
        )
    return report(problems, records, output, settings)


def records_from_outputs(outputs_file: Path, problems: list) -> list[dict[str, Any]]:
    """Prediction records for the problems that have an output in the file (parsed like generated text)."""
    outputs = read_json(outputs_file, "outputs file")
    if isinstance(outputs, dict) and isinstance(outputs.get("outputs"), dict):
        outputs = outputs["outputs"]
    if not isinstance(outputs, dict):
        raise LitAdapterError(f"{outputs_file}: expected a JSON object mapping pid -> generated text")
    outputs = {str(pid): text for pid, text in outputs.items()}
    records = []
    for problem in problems:
        if problem.pid not in outputs:
            continue
        text = outputs[problem.pid]
        if not isinstance(text, str):
            raise LitAdapterError(f"{outputs_file}: the output of pid {problem.pid} is not a string")
        records.append(prediction_record(problem.pid, text, parse_answer(text, len(problem.choices)), problem.answer))
    if not records:
        raise LitAdapterError(f"{outputs_file}: no output for any of the {len(problems)} selected problems")
    return records


def report(problems: list, records: list[dict[str, Any]], output: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Scores the records of the selected problems, prints the table and writes `metrics.json`."""
    by_pid = {record["pid"]: record for record in records}
    scorer = ScienceQAScorer()
    for problem in problems:
        if problem.pid in by_pid:
            scorer.update(problem, by_pid[problem.pid]["prediction"])
    metrics = scorer.to_dict()
    metrics["missing"] = len(problems) - metrics["num_problems"]
    metrics["truncated_prompts"] = sum(bool(by_pid[p.pid].get("truncated")) for p in problems if p.pid in by_pid)
    metrics["settings"] = settings
    write_json(metrics, output / METRICS_FILE)
    print(scorer.table())
    if metrics["missing"]:
        print(f"not scored (no output): {metrics['missing']} of {len(problems)} problems")
    if metrics["truncated_prompts"]:
        print(f"prompts cut on the left to fit the model's context: {metrics['truncated_prompts']}")
    print(f"wrote {output / METRICS_FILE} and {output / 'predictions.jsonl'}", file=sys.stderr)
    return metrics


def _str(path: Optional[Path]) -> Optional[str]:
    """A path as recorded in the settings: absolute, so that a resumed run may spell it differently."""
    return None if path is None else str(Path(path).resolve())


BENCHMARKS = {"scienceqa": scienceqa}


def eval_main(argv: list[str]) -> None:
    """`lit-adapter eval BENCHMARK [options]`; a bad argument becomes one error line (exit 2 via the main CLI)."""
    from jsonargparse import CLI

    try:
        CLI(BENCHMARKS, args=argv, prog="lit-adapter eval", as_positional=False, exit_on_error=False)
    except argparse.ArgumentError as err:
        message = re.sub(r"a typing\.Literal\[(.*?)\]", r"one of \1", " ".join(str(err).split()))
        raise LitAdapterError(message) from None
