"""The Engine: batches equal one-by-one, scores equal plain forwards, decoding runs inside the CPU context, loading
leaves process-wide torch settings alone, and `eval` answers what `generate` answers (one inference path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_adapter.adapters import save_adapter
from lit_adapter.checkpoint import load_model
from lit_adapter.cli import main
from lit_adapter.data.scienceqa import build_prompt, load_problems
from lit_adapter.inference.engine import Decoding, Engine
from lit_adapter.prompts import get_prompt_style
from tests.inference.conftest import engine_for, text_adapter

ALPACA = get_prompt_style("alpaca")
PROMPTS = ["Tell me a story", "Write a poem about a cat", "Hi", "What did Lily do in the park with her big red ball?"]


class RecordingContext:
    """A stand-in CPU decoding context that counts how deep it is entered and every enter/exit."""

    def __init__(self) -> None:
        self.depth = 0
        self.events: list[str] = []

    def __enter__(self) -> RecordingContext:
        self.depth += 1
        self.events.append("enter")
        return self

    def __exit__(self, *exc) -> None:
        self.depth -= 1
        self.events.append("exit")


@pytest.fixture
def adapter_engine(stories260k_dir: Path) -> Engine:
    return engine_for(stories260k_dir, text_adapter(load_model(stories260k_dir), lora_rank=2))


def test_generate_batch_equals_complete_one_by_one(adapter_engine: Engine) -> None:
    decoding = Decoding(max_new_tokens=24, stop=("Then", "###"))
    prompts = [adapter_engine.encode(ALPACA.apply(p)) for p in PROMPTS]
    batch = adapter_engine.generate_batch(prompts, decoding)
    for prompt, tokens in zip(prompts, batch, strict=True):
        single = adapter_engine.complete(prompt, decoding)
        assert adapter_engine.text(tokens, decoding) == single.text
        assert len(tokens) == single.new_tokens
    assert 0 < sum(len(tokens) < decoding.max_new_tokens for tokens in batch) < len(batch)  # some rows stopped early


def test_should_stop_ends_a_row(adapter_engine: Engine) -> None:
    prompts = [adapter_engine.encode(ALPACA.apply(p)) for p in PROMPTS[:2]]
    outputs = adapter_engine.generate_batch(prompts, Decoding(max_new_tokens=20), should_stop=lambda row, t: row == 0)
    assert len(outputs[0]) == 1 and len(outputs[1]) > 1


def test_score_equals_plain_forward_per_row(adapter_engine: Engine) -> None:
    rows = [adapter_engine.tokenizer.encode(ALPACA.apply(p), bos=True) for p in PROMPTS]
    spans = [(len(ids) - 4, len(ids)) for ids in rows[:-1]] + [(1, len(rows[-1]))]
    scores = adapter_engine.score(rows, spans)
    for ids, (start, end), score in zip(rows, spans, scores, strict=True):
        with torch.no_grad():
            log_probs = torch.log_softmax(adapter_engine.llama(torch.tensor([ids]))[0].float(), dim=-1)
        expected = sum(float(log_probs[t - 1, ids[t]]) for t in range(start, end))
        assert score == pytest.approx(expected, abs=1e-4)


def test_every_decoding_entry_runs_inside_the_cpu_context(stories260k_dir: Path) -> None:
    cpu = RecordingContext()
    base = engine_for(stories260k_dir, load_model(stories260k_dir))
    engine = Engine(base.llama, base.tokenizer, ALPACA, cpu=cpu)
    depths: list[int] = []
    engine.llama.register_forward_pre_hook(lambda module, args: depths.append(cpu.depth))
    ids = engine.encode("Once upon a time")
    decoding = Decoding(max_new_tokens=6)

    engine.complete(ids, decoding)
    engine.generate_batch([ids, ids[:3]], decoding)
    engine.score([ids.tolist()], [(1, ids.numel())])
    assert cpu.events == ["enter", "exit"] * 3

    stream = engine.stream(ids, Decoding(max_new_tokens=20))
    assert cpu.events == ["enter", "exit"] * 3  # a generator holds nothing until it runs
    next(stream)
    assert cpu.depth == 1
    stream.close()  # left before the end: the context is left too
    assert cpu.depth == 0 and cpu.events[-2:] == ["enter", "exit"]
    assert depths and set(depths) == {1}  # every forward pass ran inside it


def test_load_leaves_process_wide_torch_settings_alone(stories260k_dir: Path, tmp_path: Path) -> None:
    adapter = save_adapter(text_adapter(load_model(stories260k_dir), lora_rank=2), tmp_path / "adapter")
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(2)
    try:
        for path in (None, adapter):
            engine = Engine.load(stories260k_dir, path, device="cpu", precision="32-true")
            assert torch.get_num_threads() == 2
            engine.complete(engine.encode("Once upon a time"), Decoding(max_new_tokens=4))
            assert torch.get_num_threads() == 2 and torch.backends.mkldnn.enabled == mkldnn
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folded_adapter(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved V2 adapter with non-zero bias/scale, LoRA (rank 2), prompts and gates: folding changes bf16 numbers."""
    return save_adapter(text_adapter(load_model(stories260k_dir), lora_rank=2), tmp_path_factory.mktemp("adapter"))


def test_eval_and_generate_give_the_same_answers_in_bf16(
    stories260k_dir: Path, folded_adapter: Path, assets: Path, tmp_path: Path, capsys
) -> None:
    """`lit-adapter eval scienceqa` (generate mode) and `lit-adapter generate` load, fold and decode alike."""
    sample, max_new = assets / "scienceqa", 24
    common = ["--checkpoint_dir", str(stories260k_dir), "--adapter", str(folded_adapter), "--precision", "bf16-true",
              "--device", "cpu", "--max_new_tokens", str(max_new), "--batch_size", "1"]
    engine = Engine.load(stories260k_dir, folded_adapter, device="cpu", precision="bf16-true")
    assert not any("lora" in name or name.endswith(".scale") for name in engine.llama.state_dict())  # all folded

    main(["eval", "scienceqa", "--data_dir", str(sample), "--limit", "16", "--output", str(tmp_path / "eval"),
          *common])
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    problems = {p.pid: p for p in load_problems(sample, "test")}
    whole = [r for r in records if not r["truncated"]]  # a cut prompt is eval's own (generate refuses it)
    assert len(whole) >= 10
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": build_prompt(problems[r["pid"]])}) + "\n" for r in whole))

    main(["generate", "--prompts_file", str(prompts_file), "--output_file", str(tmp_path / "generated.jsonl"),
          "--temperature", "0", *common])
    capsys.readouterr()
    rows = [json.loads(line) for line in (tmp_path / "generated.jsonl").read_text().splitlines()]
    for record, row in zip(whole, rows, strict=True):
        prompt = ALPACA.apply(build_prompt(problems[record["pid"]]))
        assert row["prompt_tokens"] == len(engine.tokenizer.encode(prompt, bos=True))  # the prompt eval built
        assert row["output"] == record["output"], record["pid"]
    assert len({row["output"] for row in rows}) > 1  # the answers depend on the problem

