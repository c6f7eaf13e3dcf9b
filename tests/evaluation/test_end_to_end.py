"""`lit-adapter eval scienceqa` with the real stories260K model and a fresh adapter on the ScienceQA sample.

The model knows only children's stories, so its accuracy means nothing; the tests check that the predictions are
what a plain one-problem-at-a-time computation gives, and that the scores add up.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import lit_adapter.evaluation.run
from lit_adapter.adapters import AdapterConfig, VisualConfig, build_adapter_model, load_adapter_model, save_adapter
from lit_adapter.checkpoint import load_model, tokenizer_path
from lit_adapter.cli import main
from lit_adapter.data.encoding import encode_segments
from lit_adapter.data.scienceqa import build_prompt, load_problems, training_segments
from lit_adapter.evaluation.scienceqa import COLUMNS, ScienceQAScorer, parse_answer
from lit_adapter.inference.generate import generate_tokens
from lit_adapter.prompts import get_prompt_style
from lit_adapter.tokenizer import Tokenizer

ALPACA = get_prompt_style("alpaca")


def nonzero_gates(model) -> None:
    """A fresh adapter has zero gates (it equals the base model); open them so the adapter changes the output."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate"):
                param.fill_(0.5)


@pytest.fixture(scope="module")
def adapter_dir(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_adapter_model(stories260k_dir, AdapterConfig.v1(adapter_len=4, adapter_layers=3))
    model.reset_adapter_parameters()
    nonzero_gates(model)
    return save_adapter(model, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def sample(assets: Path) -> Path:
    return assets / "scienceqa"


def run_eval(*args: str) -> None:
    main(["eval", "scienceqa", "--device", "cpu", "--precision", "32-true", *args])


def read_predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def check_metrics(out: Path, sample: Path, records: list[dict]) -> dict:
    """metrics.json agrees with the predictions file, scored again here."""
    metrics = json.loads((out / "metrics.json").read_text())
    by_pid = {p.pid: p for p in load_problems(sample, "test")}
    scorer = ScienceQAScorer()
    for record in records:
        problem = by_pid[record["pid"]]
        assert record["answer"] == problem.answer
        assert record["correct"] == (record["prediction"] == problem.answer)
        scorer.update(problem, record["prediction"])
    assert metrics["num_problems"] == len(records)
    assert metrics["correct"]["Avg"] == sum(r["correct"] for r in records)
    assert metrics["accuracy"]["Avg"] == pytest.approx(100 * metrics["correct"]["Avg"] / len(records))
    assert metrics["unparseable"] == sum(r["prediction"] is None for r in records)
    assert metrics["total"] == {c: s.total for c, s in scorer.compute().items()}
    assert list(metrics["accuracy"]) == list(COLUMNS)
    return metrics


def reference_scores(model, tokenizer: Tokenizer, problem, images=None) -> list[float]:
    """Summed log-probability of each option's answer sentence, one unpadded forward per option."""
    scores = []
    for choice in range(len(problem.choices)):
        segments = training_segments(dataclasses.replace(problem, answer=choice), ALPACA)
        ids, supervised = encode_segments(tokenizer, segments)
        ids, supervised = ids[:-1], supervised[:-1]  # the closing EOS is not part of the sentence
        with torch.no_grad():
            logits = model(torch.tensor([ids]), images=images)[0].float()
        log_probs = torch.log_softmax(logits[:-1], dim=-1)
        scores.append(sum(float(log_probs[t - 1, ids[t]]) for t in range(len(ids)) if supervised[t]))
    return scores


def test_likelihood_mode_matches_one_by_one_scoring(
    stories260k_dir: Path, adapter_dir: Path, sample: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    run_eval("--data_dir", str(sample), "--checkpoint_dir", str(stories260k_dir), "--adapter", str(adapter_dir),
             "--mode", "likelihood", "--limit", "4", "--batch_size", "3", "--output", str(out))
    assert "unparseable answers: 0 of 4" in capsys.readouterr().out

    records = read_predictions(out)
    problems = load_problems(sample, "test")[:4]
    assert [r["pid"] for r in records] == [p.pid for p in problems]
    model = load_adapter_model(stories260k_dir, adapter_dir)
    tokenizer = Tokenizer(tokenizer_path(stories260k_dir))
    compared = 0
    for record, problem in zip(records, problems, strict=True):
        assert len(record["scores"]) == len(problem.choices)
        best = max(range(len(problem.choices)), key=record["scores"].__getitem__)
        assert record["prediction"] == best
        assert record["output"] == f"The answer is ({'ABCDE'[best]})."
        if not record["truncated"]:
            assert record["scores"] == pytest.approx(reference_scores(model, tokenizer, problem), abs=1e-3)
            compared += 1
    assert compared == 3
    assert [r["truncated"] for r in records] == [False, True, False, False]  # pid 5: longer than the 512 context
    metrics = check_metrics(out, sample, records)
    assert metrics["settings"]["mode"] == "likelihood" and metrics["truncated_prompts"] == 1


def test_generate_mode_matches_sequential_greedy_decoding(
    stories260k_dir: Path, adapter_dir: Path, sample: Path, tmp_path: Path, capsys
) -> None:
    out, max_new = tmp_path / "out", 8
    run_eval("--data_dir", str(sample), "--checkpoint_dir", str(stories260k_dir), "--adapter", str(adapter_dir),
             "--limit", "3", "--batch_size", "2", "--max_new_tokens", str(max_new), "--output", str(out))
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == list(COLUMNS) and table[2].split()[1] == "3"

    records = read_predictions(out)
    model = load_adapter_model(stories260k_dir, adapter_dir)
    tokenizer = Tokenizer(tokenizer_path(stories260k_dir))
    context = model.config.max_seq_len
    for record, problem in zip(records, load_problems(sample, "test")[:3], strict=True):
        ids = tokenizer.encode(ALPACA.apply(build_prompt(problem)))
        if len(ids) > context - max_new:  # the oldest prompt tokens give way, BOS stays
            ids = ids[:1] + ids[len(ids) - (context - max_new) + 1:]
        assert record["truncated"] == (problem.pid == "5")
        expected = list(generate_tokens(model.llama, torch.tensor(ids), max_new, eos_id=tokenizer.eos_id))
        assert record["output"] == tokenizer.decode(expected)
        assert record["prediction"] == parse_answer(record["output"], len(problem.choices))
    check_metrics(out, sample, records)


def test_base_model_with_captions(stories260k_dir: Path, sample: Path, tmp_path: Path) -> None:
    """No adapter: the plain model answers; the caption text reaches the prompt of problems with an image."""
    out = tmp_path / "out"
    run_eval("--data_dir", str(sample), "--checkpoint_dir", str(stories260k_dir), "--captions",
             str(sample / "captions.json"), "--mode", "likelihood", "--limit", "3", "--output", str(out))
    records = read_predictions(out)
    base = load_model(stories260k_dir)
    tokenizer = Tokenizer(tokenizer_path(stories260k_dir))
    captions = json.loads((sample / "captions.json").read_text())["captions"]
    problem = load_problems(sample, "test")[2]  # pid 11: an image with a caption, short enough to be whole
    assert problem.image and problem.pid in captions and not records[2]["truncated"]
    scores = []
    for choice in range(len(problem.choices)):
        segments = training_segments(dataclasses.replace(problem, answer=choice), ALPACA, captions[problem.pid])
        assert captions[problem.pid] in segments[0][0]
        ids, supervised = encode_segments(tokenizer, segments)
        with torch.no_grad():
            log_probs = torch.log_softmax(base(torch.tensor([ids[:-1]]))[0, :-1].float(), dim=-1)
        scores.append(sum(float(log_probs[t - 1, ids[t]]) for t in range(1, len(ids) - 1) if supervised[t]))
    assert records[2]["scores"] == pytest.approx(scores, abs=1e-3)


def test_resume_skips_answered_problems(
    stories260k_dir: Path, adapter_dir: Path, sample: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    out = tmp_path / "out"
    args = ["--data_dir", str(sample), "--checkpoint_dir", str(stories260k_dir), "--adapter", str(adapter_dir),
            "--mode", "likelihood", "--output", str(out)]
    run_eval(*args, "--limit", "2")
    capsys.readouterr()
    first = read_predictions(out)
    assert [r["pid"] for r in first] == ["4", "5"]
    # mark the stored answers: a re-run that recomputed them would overwrite the marks
    first[0]["output"] = "kept"
    lines = [json.dumps(r) for r in first]
    # and leave a torn last line, as a run stopped in mid-write would
    (out / "predictions.jsonl").write_text("\n".join(lines) + '\n{"pid": "11", "outp')

    run_eval(*args, "--limit", "3")
    assert "resuming: 2 of 3 problems already answered" in capsys.readouterr().err
    second = read_predictions(out)
    assert [r["pid"] for r in second] == ["4", "5", "11"]
    assert second[0]["output"] == "kept" and second[:2] == first
    check_metrics(out, sample, second)

    # nothing left to do: no model is loaded, the metrics are written again
    (out / "metrics.json").unlink()

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded with every problem answered")

    monkeypatch.setattr(lit_adapter.evaluation.run, "build_predictor", no_model)
    run_eval(*args, "--limit", "3")
    assert "resuming: 3 of 3" in capsys.readouterr().err
    assert (out / "metrics.json").is_file()


def test_resume_refuses_other_settings(stories260k_dir: Path, sample: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["--data_dir", str(sample), "--checkpoint_dir", str(stories260k_dir), "--output", str(out), "--limit", "1"]
    run_eval(*args, "--mode", "likelihood")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_eval(*args, "--mode", "generate")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {out} holds predictions made with mode='likelihood' (now 'generate'): choose another "
                   "--output, or remove the folder to start over")
    # scoring an outputs file into the same folder would overwrite the model's predictions
    outputs = tmp_path / "outputs.json"
    outputs.write_text('{"4": "The answer is (A)."}')
    before = (out / "predictions.jsonl").read_text()
    with pytest.raises(SystemExit):
        main(["eval", "scienceqa", "--data_dir", str(sample), "--outputs_file", str(outputs), "--output", str(out)])
    assert "holds predictions made with" in capsys.readouterr().err
    assert (out / "predictions.jsonl").read_text() == before


def test_visual_adapter_sees_the_images(stories260k_dir: Path, sample: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    torch.manual_seed(0)
    visual = VisualConfig(clip_model="lit-adapter-tiny-vit", clip_pretrained=None, visual_len=4, n_blocks=1,
                          block_heads=2)
    model = build_adapter_model(stories260k_dir,
                                AdapterConfig.v2(adapter_len=4, visual=visual, bias_mode="none", train_norms=False))
    model.reset_adapter_parameters()
    nonzero_gates(model)
    # the frozen CLIP tower is not part of the adapter file: keep its random weights in a file the config names
    clip_file = tmp_path / "clip.pt"
    torch.save(model.visual.clip.visual.state_dict(), clip_file)
    model.adapter_config.visual.clip_pretrained = str(clip_file)
    adapter = save_adapter(model, tmp_path / "adapter")

    problems = load_problems(sample, "test")[:3]  # pid 4 (no image), 5 (an image, cut to fit), 11 (an image)
    images = tmp_path / "images"
    for index, problem in enumerate(problems):
        if problem.image:
            (images / problem.pid).mkdir(parents=True)
            Image.new("RGB", (40, 30), (60 * index, 255 - 50 * index, 90)).save(images / problem.pid / problem.image)
    common = ["--data_dir", str(sample), "--checkpoint_dir", str(stories260k_dir), "--adapter", str(adapter),
              "--mode", "likelihood", "--limit", "3", "--batch_size", "3"]
    run_eval(*common, "--images", str(images), "--output", str(tmp_path / "with"))
    run_eval(*common, "--output", str(tmp_path / "without"))
    assert "no --images were given" in capsys.readouterr().err

    loaded = load_adapter_model(stories260k_dir, adapter)
    tokenizer = Tokenizer(tokenizer_path(stories260k_dir))
    transform = loaded.adapter_config.visual.transform(train=False)
    with_images, without = read_predictions(tmp_path / "with"), read_predictions(tmp_path / "without")
    for problem, seen, blind in zip(problems, with_images, without, strict=True):
        if seen["truncated"]:
            continue
        pixels = transform(Image.open(images / problem.pid / problem.image))[None] if problem.image else None
        assert seen["scores"] == pytest.approx(reference_scores(loaded, tokenizer, problem, pixels), abs=1e-3)
        if problem.image:
            assert seen["scores"] != pytest.approx(blind["scores"], abs=1e-3)
        else:
            assert seen["scores"] == pytest.approx(blind["scores"], abs=1e-4)
