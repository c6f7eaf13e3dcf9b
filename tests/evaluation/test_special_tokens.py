"""ScienceQA prompts get BOS from the tokenizer only when the prompt style does not write its own special tokens
(a chat template starts with them), in generate and likelihood mode alike, as `generate` and training encode them."""

from __future__ import annotations

import dataclasses

import pytest

from lit_adapter.data.encoding import encode_segments
from lit_adapter.data.scienceqa import load_problems, training_segments
from lit_adapter.evaluation.predict import ScienceQAPredictor
from lit_adapter.inference.engine import Engine


@pytest.mark.parametrize("adds_special_tokens", [True, False])
def test_prompts_carry_bos_only_where_the_style_does_not_write_it(stories260k_dir, assets, monkeypatch,
                                                                  adds_special_tokens):
    engine = Engine.load(stories260k_dir, prompt_style="alpaca")
    engine.style = dataclasses.replace(engine.style, adds_special_tokens=adds_special_tokens)
    problem = load_problems(assets / "scienceqa", "test")[0]
    predictor = ScienceQAPredictor(engine)
    tokenizer = engine.tokenizer

    seen = []
    monkeypatch.setattr(engine, "generate_batch", lambda prompts, *args: seen.extend(prompts) or [[] for _ in prompts])
    predictor.generate([problem], max_new_tokens=4)
    text = predictor.prompt_text(problem)
    assert seen[0].tolist() == tokenizer.encode(text, bos=adds_special_tokens)
    assert (seen[0][0].item() == tokenizer.bos_id) == adds_special_tokens

    rows, _, _ = predictor.candidate_ids(problem)
    segments = training_segments(dataclasses.replace(problem, answer=0), engine.style)
    expected, _ = encode_segments(tokenizer, segments, special=adds_special_tokens)
    assert rows[0] == expected[:-1] and (rows[0][0] == tokenizer.bos_id) == adds_special_tokens
