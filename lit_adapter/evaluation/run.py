"""Running a model over the problems not yet answered in an output folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from lit_adapter.errors import LitAdapterError
from lit_adapter.evaluation.predict import ScienceQAPredictor
from lit_adapter.evaluation.results import PredictionLog
from lit_adapter.inference.engine import Engine


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
    encoder_weights: Optional[Path] = None,
) -> list[dict[str, Any]]:
    """Answers every problem that has no record in `log` yet (appending as it goes); returns all records."""
    done = log.read()
    todo = [p for p in problems if p.pid not in done]
    if len(todo) < len(problems):
        print(f"resuming: {len(problems) - len(todo)} of {len(problems)} problems already answered in {log.path}",
              file=sys.stderr)
    if todo:
        predictor = build_predictor(checkpoint_dir, adapter, captions, images, prompt_style, precision, device,
                                    encoder_weights)
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
    encoder_weights: Optional[Path] = None,
) -> ScienceQAPredictor:
    """The engine (loaded exactly as `lit-adapter generate` loads it) with the run's captions and images; an
    ImageBind-LLM adapter sees the images through the ImageBind encoder of `encoder_weights`."""
    from lit_adapter.data.scienceqa import load_captions

    # without an adapter the base model still answers in a template (alpaca), as it would after finetuning
    style = prompt_style or ("alpaca" if adapter is None else None)
    engine = Engine.load(checkpoint_dir, adapter, device, precision, prompt_style=style)
    if encoder_weights is not None:
        attach_imagebind(engine, encoder_weights)
    if images is not None and not engine.multimodal:
        raise LitAdapterError("--images needs an adapter with a visual encoder; this adapter has none")
    if images is None and engine.multimodal:
        print("warning: the adapter has a visual encoder but no --images were given; answering from text alone",
              file=sys.stderr)
    return ScienceQAPredictor(
        engine, captions=load_captions(captions) if captions is not None else None, image_dir=images
    )


def attach_imagebind(engine: Engine, encoder_weights: Path) -> None:
    from lit_adapter.media.inputs import bind_visual, prepare_bind

    prepare_bind(bind_visual(engine.adapter_model, f"--encoder_weights {encoder_weights}"), encoder_weights)
