"""`lit-adapter eval BENCHMARK ...`: benchmark evaluations (ScienceQA; any lm-evaluation-harness task)."""

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
    encoder_weights: Optional[Path] = None,
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
        encoder_weights: (ImageBind-LLM) the ImageBind weights (imagebind_w3D.pth) through which the adapter
            sees the --images.
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
            "encoder_weights": _str(encoder_weights),
            "max_new_tokens": max_new_tokens if mode == "generate" else None,
        }
        check_settings(output, settings)
        records = predict_all(
            problems, PredictionLog(output), checkpoint_dir, adapter, captions, images, batch_size, mode,
            max_new_tokens, prompt_style, precision, device, encoder_weights,
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


def lm_eval(
    checkpoint_dir: Path,
    tasks: str,
    adapter: Optional[Path] = None,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    output_path: Optional[Path] = None,
    include_path: Optional[Path] = None,
    batch_size: int = 8,
    max_gen_toks: int = 256,
    add_bos_token: Optional[bool] = None,
    seed: int = 0,
    precision: Precision = "auto",
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate with lm-evaluation-harness (its tasks, metrics and table) through our inference engine, so that
    adapters no Hugging Face model can run (prompts, V1) are evaluated too.

    Args:
        checkpoint_dir: the base model folder (from `lit-adapter convert`).
        tasks: comma-separated lm-eval task names (from its registry, which downloads the datasets) or task YAML
            files (e.g. over local files).
        adapter: an adapter (ours, official, PEFT or LitGPT); without it the base model answers.
        num_fewshot: examples put before each question; default: the task's.
        limit: evaluate only the first N documents of each task (a fraction below 1: that share).
        output_path: where to write lm-eval's results JSON (a .json file, or a folder for results.json).
        include_path: a folder of further task YAML files.
        batch_size: requests scored together.
        max_gen_toks: the most new tokens of a generation, unless the task sets its own.
        add_bos_token: true / false: BOS before every context or never; default: where the tokenizer puts one (as
            lm-eval's own hf model).
        seed: lm-eval's random seeds (few-shot sampling).
        precision: 32-true, bf16-true or 16-true; auto = bf16-true on a GPU that supports it, else 32-true.
        device: cpu, cuda, cuda:1, ... or auto.
    """
    try:
        from lit_adapter.evaluation import lm_eval as harness
    except ImportError as err:
        raise LitAdapterError(f"lm-eval is not installed ({err}); pip install lm-eval") from None
    from lit_adapter.files import write_text
    from lit_adapter.inference.engine import Engine

    if batch_size < 1:
        raise LitAdapterError(f"--batch_size must be at least 1 (got {batch_size})")
    engine = Engine.load(checkpoint_dir, adapter, device=device, precision=precision, prompt_style="raw")
    model = harness.EngineLM(engine, batch_size=batch_size, max_gen_toks=max_gen_toks, add_bos_token=add_bos_token)
    results = harness.evaluate(model, tasks, num_fewshot, limit, include_path, seed)
    from lm_eval.utils import make_table

    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if output_path is not None:
        path = Path(output_path)
        path = path if path.suffix == ".json" else path / "results.json"
        write_text(harness.results_json(results) + "\n", path)
        print(f"wrote {path}", file=sys.stderr)
    return results


BENCHMARKS = {"scienceqa": scienceqa, "lm-eval": lm_eval}


def eval_main(argv: list[str]) -> None:
    """`lit-adapter eval BENCHMARK [options]`; a bad argument becomes one error line (exit 2 via the main CLI)."""
    from jsonargparse import CLI

    try:
        CLI(BENCHMARKS, args=argv, prog="lit-adapter eval", as_positional=False, exit_on_error=False)
    except argparse.ArgumentError as err:
        message = re.sub(r"a typing\.Literal\[(.*?)\]", r"one of \1", " ".join(str(err).split()))
        raise LitAdapterError(message) from None
