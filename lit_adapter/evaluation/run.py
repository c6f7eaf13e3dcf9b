"""Running a model over the problems not yet answered in an output folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from lit_adapter.checkpoint import tokenizer_path
from lit_adapter.errors import LitAdapterError
from lit_adapter.evaluation.results import PredictionLog
from lit_adapter.tokenizer import Tokenizer


def predict_all(
    problems: list,
    log: PredictionLog,
    checkpoint_dir: Path,
    adapter: Optional[Path],
    captions: Optional[Path],
    images: Optional[Path],
    batch_size: int,
    mode: str,
    max_new_tokens: int,
    prompt_style: Optional[str],
    precision: str,
    device: str,
) -> list[dict[str, Any]]:
    """Answers every problem that has no record in `log` yet (appending as it goes); returns all records."""
    done = log.read()
    todo = [p for p in problems if p.pid not in done]
    if len(todo) < len(problems):
        print(f"resuming: {len(problems) - len(todo)} of {len(problems)} problems already answered in {log.path}",
              file=sys.stderr)
    if todo:
        predictor = build_predictor(checkpoint_dir, adapter, captions, images, prompt_style, precision, device)
        with tqdm(total=len(todo), desc=f"ScienceQA ({mode})", unit="problem", file=sys.stderr) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start: start + batch_size]
                if mode == "likelihood":
                    records = predictor.likelihood(batch)
                else:
                    records = predictor.generate(batch, max_new_tokens)
                for record in records:
                    log.append(record)
                    done[record["pid"]] = record
                bar.update(len(batch))
    return [done[p.pid] for p in problems]


def build_predictor(
    checkpoint_dir: Path,
    adapter: Optional[Path],
    captions: Optional[Path],
    images: Optional[Path],
    prompt_style: Optional[str],
    precision: str,
    device: str,
):
    from lit_adapter.adapters import load_adapter_model
    from lit_adapter.data.scienceqa import load_captions
    from lit_adapter.devices import resolve_device, resolve_dtype
    from lit_adapter.evaluation.predict import ImageLoader, ScienceQAPredictor

    dev = resolve_device(device)
    model, config = load_adapter_model(checkpoint_dir, adapter, dev, resolve_dtype(precision, dev))
    model.eval()
    image_loader = None
    if images is not None:
        if model.visual is None:
            raise LitAdapterError("--images needs an adapter with a visual encoder; this adapter has none")
        image_loader = ImageLoader(images, config.visual.transform(train=False))
    elif model.visual is not None:
        print("warning: the adapter has a visual encoder but no --images were given; answering from text alone",
              file=sys.stderr)
    return ScienceQAPredictor(
        model,
        Tokenizer(tokenizer_path(checkpoint_dir)),
        prompt_style or getattr(config, "prompt_style", None) or "alpaca",
        dev,
        captions=load_captions(captions) if captions is not None else None,
        images=image_loader,
    )
