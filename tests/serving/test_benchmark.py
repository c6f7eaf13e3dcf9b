"""benchmarks/serve.py end to end on a tiny model: the real server process, concurrent and one-at-a-time streaming
clients, every request answered with its tokens counted."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import serve as bench

TINY = ["--vocab_size", "300", "--dim", "32", "--n_layers", "2", "--n_heads", "2", "--hidden_dim", "64",
        "--prompt_len", "6", "--new_tokens", "8", "--prompts", "4", "--threads", "1"]


def test_word_tokenizer_of_the_benchmark_model(tmp_path: Path) -> None:
    from lit_adapter.tokenizer import Tokenizer

    args = bench.parse_args(TINY)
    folder = bench.write_model(args, tmp_path / "model")
    tokenizer = Tokenizer(folder / "tokenizer.json")
    prompt = bench.make_prompts(args)[0]
    ids = tokenizer.encode(prompt, bos=True)
    assert ids[0] == 1 and len(ids) == args.prompt_len + 1  # BOS, then one token per word
    assert [f"w{i}" for i in ids[1:]] == prompt.split()
    assert tokenizer.decode(ids[1:]) == prompt


def test_benchmark_runs_and_counts_every_request(tmp_path: Path, capsys) -> None:
    out = tmp_path / "serve.json"
    bench.main([*TINY, "--clients", "4", "--requests", "12", "--serial", "2", "--max_batch_size", "4",
                "--json", str(out)])
    report = json.loads(out.read_text())
    for phase, requests in (("serial", 2), ("concurrent", 12)):
        assert report[phase]["requests"] == requests and report[phase]["failed"] == 0, report[phase]["errors"]
        assert 0 < report[phase]["new_tokens"] <= requests * 8
    assert report["speedup"] > 0 and report["memory_mb"]["end"] > 0
    assert "| 4 concurrent" in capsys.readouterr().out
