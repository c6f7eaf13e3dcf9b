"""`lit-adapter eval lm-eval`: lm-evaluation-harness tasks (local task YAML files over local JSON lines, offline)
through our engine. Without an adapter, the numbers equal those of lm-eval's own `hf` model on the transformers
export of the same base (every request's log-likelihood and every generated text, to 1e-4); with a V1 adapter
(non-zero gates) the run works and its numbers differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_adapter.adapters import AdapterConfig, build_adapter_model, save_adapter
from lit_adapter.convert.export import export
from tests.adapters.helpers import randomize
from tests.helpers import run_main

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

TOLERANCE = 1e-4
QUESTIONS = [
    ("Once upon a time, there was a little", ["girl", "dog", "car", "tree"], 0),
    ("Lily liked to play in the", ["park", "sky", "moon", "table"], 0),
    ("The sun was", ["hot", "blue", "sad", "big"], 0),
    ("Tom had a red", ["ball", "cat", "fish", "idea"], 0),
    ("They went to the", ["store", "sea", "house", "dream"], 0),
    ("She was very", ["happy", "tall", "angry", "wet"], 0),
]
PROMPTS = ["Once upon a time", "Lily saw a big", "One day, Tom went", "The little bird", "Mom said"]
TEXTS = ["Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
         "Tom had a big red ball. He liked to throw it to his dog, who ran after it every time."]


def write_tasks(folder: Path) -> list[Path]:
    """A multiple-choice task, a generation task and a rolling log-likelihood task over local JSON lines."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "mc": [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS],
        "gen": [{"prompt": p, "target": " there"} for p in PROMPTS],
        "ppl": [{"text": t} for t in TEXTS],
    }
    for name, rows in data.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = ("dataset_path: json\ndataset_kwargs:\n  cache_dir: {cache}\n  data_files:\n    test: {path}\n"
              "test_split: test\n")  # datasets' cache in the test's folder, not the home folder
    tasks = {
        "tiny_mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
                   "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "tiny_gen": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
                    "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 12\n  do_sample: false\n"
                    "metric_list:\n  - metric: exact_match\n",
        "tiny_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: '{{text}}'\ndoc_to_target: '{{text}}'\n"
                    "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
    }
    paths = []
    for (task, body), name in zip(tasks.items(), data, strict=True):
        path = folder / f"{task}.yaml"
        path.write_text(f"task: {task}\n" + common.format(path=folder / f"{name}.jsonl", cache=folder / "cache") + body)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> str:
    return ",".join(str(p) for p in write_tasks(tmp_path_factory.mktemp("lm-eval-tasks")))


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """A tiny model: one torch thread."""


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run(capsys, monkeypatch, checkpoint_dir: Path, tasks: str, out: Path, *extra: str) -> dict:
    code, stdout, stderr = run_main(["eval", "lm-eval", "--checkpoint_dir", str(checkpoint_dir), "--tasks", tasks,
                                     "--batch_size", "4", "--output_path", str(out), *extra], capsys, monkeypatch)
    assert code == 0, stderr
    assert "tiny_mc" in stdout and "acc" in stdout  # lm-eval's table
    return json.loads(out.read_text())


def samples_of(results: dict) -> dict[str, list]:
    return {task: [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in results["samples"].items()}


def flat_scores(responses) -> list[float]:
    values = []
    for resp in responses:
        for item in resp:
            item = item[0] if isinstance(item, (list, tuple)) else item
            values.append(item)
    return values


def test_lm_eval_matches_lm_evals_own_hf_model(stories260k_dir: Path, tasks: str, tmp_path: Path, capsys,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    ours = run(capsys, monkeypatch, stories260k_dir, tasks, tmp_path / "ours.json")
    hf_folder = export(stories260k_dir, tmp_path / "hf", format="hf")
    names = [Path(p).stem for p in tasks.split(",")]
    reference = simple_evaluate(
        model=HFLM(pretrained=str(hf_folder), dtype="float32", device="cpu", batch_size=4), tasks=names,
        task_manager=TaskManager(include_path=str(Path(tasks.split(",")[0]).parent), include_defaults=False),
        log_samples=True,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    for task in names:
        for metric, value in reference["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                print(f"{task} {metric}: ours {ours['results'][task][metric]:.6f}, hf {value:.6f}")
                assert ours["results"][task][metric] == pytest.approx(value, abs=TOLERANCE), (task, metric)
    ours_samples, hf_samples = samples_of(ours), samples_of(reference)
    assert ours_samples["tiny_gen"] == hf_samples["tiny_gen"]  # the same generated texts
    print("generated:", [r[0] for r in ours_samples["tiny_gen"]])
    assert any(r[0].strip() for r in ours_samples["tiny_gen"])
    for task in ("tiny_mc", "tiny_ppl"):
        assert flat_scores(ours_samples[task]) == pytest.approx(flat_scores(hf_samples[task]), abs=TOLERANCE)


def test_lm_eval_runs_a_v1_adapter(stories260k_dir: Path, tasks: str, tmp_path: Path, capsys,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_adapter_model(stories260k_dir, AdapterConfig.v1(adapter_layers=3, adapter_len=4)).eval()
    randomize(model, seed=7)
    assert all(float(p.detach().abs().min()) > 0 for n, p in model.adapter_parameters().items() if n.endswith("gate"))
    save_adapter(model, tmp_path / "v1")
    base = run(capsys, monkeypatch, stories260k_dir, tasks, tmp_path / "base.json", "--limit", "3")
    adapted = run(capsys, monkeypatch, stories260k_dir, tasks, tmp_path / "v1.json", "--limit", "3",
                  "--adapter", str(tmp_path / "v1"))
    assert flat_scores(samples_of(base)["tiny_mc"]) != pytest.approx(flat_scores(samples_of(adapted)["tiny_mc"]),
                                                                     abs=1e-3)
    assert adapted["results"]["tiny_ppl"]["word_perplexity,none"] != pytest.approx(
        base["results"]["tiny_ppl"]["word_perplexity,none"], rel=1e-4)
