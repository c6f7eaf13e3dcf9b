"""`lit-adapter generate`: JSON output, stop sequences, stdin, adapters (files, merged or not), batch mode, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_adapter.adapters import save_adapter
from lit_adapter.adapters.merge import merge, merge_linears
from lit_adapter.checkpoint import load_model
from lit_adapter.inference import engine as engine_module
from lit_adapter.inference.cli import normalize_argv
from lit_adapter.inference.generate import generate_tokens
from lit_adapter.prompts import get_prompt_style
from tests.helpers import run_main as run
from tests.helpers import write_image
from tests.inference.conftest import text_adapter, visual_adapter

ROOT = Path(__file__).resolve().parents[2]


def run_json(args: list[str], capsys) -> dict:
    code, out, err = run([*args, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def adapter_dir(stories260k_dir, tmp_path_factory) -> Path:
    """A saved V2 adapter (bias/scale, norms, LoRA, open gates) with its prompt style (alpaca)."""
    out = tmp_path_factory.mktemp("adapter")
    save_adapter(text_adapter(load_model(stories260k_dir), lora_rank=2), out)
    return out


def test_json_output_matches_the_streamed_text(stories260k_dir, capsys):
    args = ["generate", "--checkpoint_dir", str(stories260k_dir), "--prompt", "Once upon a time", "--max_new_tokens",
            "25"]
    code, streamed, err = run(args, capsys)
    assert code == 0 and "tokens/s" in err
    record = run_json(args, capsys)
    assert record["text"] + "\n" == streamed
    assert record["prompt_tokens"] == 5 and record["new_tokens"] == 25 and record["finish"] == "length"
    assert record["tokens_per_sec"] > 0


def test_stop_sequences_repeatable_and_cut(stories260k_dir, capsys):
    base = ["generate", "--checkpoint_dir", str(stories260k_dir), "--prompt", "Once upon a time", "--max_new_tokens",
            "40"]
    full = run_json(base, capsys)["text"]
    assert "Lily" in full and "park" in full
    stopped = run_json([*base, "--stop", "park", "--stop", "Lily"], capsys)
    assert stopped["text"] == full[: full.index("Lily")] and stopped["finish"] == "stop"
    code, out, _ = run([*base, "--stop=park"], capsys)
    assert code == 0 and out == full[: full.index("park")] + "\n"


def test_argv_flags_and_verbatim_stop_values():
    assert normalize_argv(["--json", "--stop", "###", "--no_merge", "false", "--stop", "a: b"]) == [
        "--json", "true", "--no_merge", "false", "--stop", '["###", "a: b"]']


def test_prompt_from_stdin(stories260k_dir, capsys, monkeypatch):
    args = ["generate", "--checkpoint_dir", str(stories260k_dir), "--max_new_tokens", "15", "--json"]
    code, piped, _ = run([*args, "--prompt", "-"], capsys, monkeypatch, stdin="Lily and Tom\n")
    assert code == 0
    piped, given = json.loads(piped), run_json([*args[:-1], "--prompt", "Lily and Tom"], capsys)
    assert (piped["text"], piped["prompt_tokens"]) == (given["text"], given["prompt_tokens"])
    assert given["prompt_tokens"] > 1 and given["text"]


def test_adapter_prompt_style_decoding_defaults_and_merging(
    stories260k_dir, adapter_dir, tmp_path, capsys, monkeypatch
):
    seen = []
    original = engine_module.generate_tokens

    def recording(model, prompt, max_new_tokens, temperature, top_k, top_p, *args, **kwargs):
        seen.append((temperature, top_p))
        return original(model, prompt, max_new_tokens, temperature, top_k, top_p, *args, **kwargs)

    monkeypatch.setattr(engine_module, "generate_tokens", recording)
    common = ["generate", "--checkpoint_dir", str(stories260k_dir), "--prompt", "Tell me a story", "--max_new_tokens",
              "20"]
    run_json([*common, "--adapter", str(adapter_dir), "--seed", "3"], capsys)
    run_json(common, capsys)
    assert seen == [(0.1, 0.75), (0.0, 1.0)]  # the paper's decoding with an adapter; greedy for the bare base

    greedy = [*common, "--adapter", str(adapter_dir), "--temperature", "0"]
    folded = run_json(greedy, capsys)
    separate = run_json([*greedy, "--no_merge"], capsys)
    merged_dir = tmp_path / "merged"
    merge(stories260k_dir, adapter_dir, merged_dir)
    from_merged = run_json(["generate", "--checkpoint_dir", str(merged_dir), "--adapter", str(merged_dir),
                            "--prompt", "Tell me a story", "--max_new_tokens", "20", "--temperature", "0"], capsys)

    tokenizer_ids = load_tokenizer_ids(stories260k_dir, get_prompt_style("alpaca").apply("Tell me a story"))
    reference = text_adapter(load_model(stories260k_dir), lora_rank=2)
    expected = list(generate_tokens(reference.llama, torch.tensor(tokenizer_ids), 20, eos_id=2))
    assert folded["prompt_tokens"] == len(tokenizer_ids)  # the saved style (alpaca) was applied
    assert folded["text"] == separate["text"] == from_merged["text"] == decode(stories260k_dir, expected)
    raw = run_json([*greedy, "--prompt_style", "raw"], capsys)
    assert raw["prompt_tokens"] == len(load_tokenizer_ids(stories260k_dir, "Tell me a story"))


def test_merge_linears_keeps_the_logits(stories260k_dir, tokenizer):
    model = text_adapter(load_model(stories260k_dir), lora_rank=2)
    ids = torch.tensor([tokenizer.encode("Once upon a time there was")])
    with torch.no_grad():
        before = model.llama(ids)
        assert merge_linears(model) == 5 * 7
        after = model.llama(ids)
    assert not any("lora" in name or name.endswith(".scale") for name, _ in model.named_parameters())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    bypass = text_adapter(load_model(stories260k_dir), lora_rank=2, prompt_kv_lora=False)
    assert merge_linears(bypass) == 5 * 5  # wk/wv keep their LoRA apart from the prompts' projections


def test_batch_file_equals_one_by_one(stories260k_dir, adapter_dir, tmp_path, capsys):
    prompts = [{"prompt": "Tell me a story"}, {"prompt": "Write a poem about a cat", "input": "The cat is red."},
               {"prompt": "Hi"}, {"prompt": "What did Lily do in the park with her big red ball?"}]
    prompts_file = tmp_path / "in.jsonl"
    prompts_file.write_text("\n".join(json.dumps(p) for p in prompts) + "\n")
    out_file = tmp_path / "out" / "results.jsonl"
    common = ["generate", "--checkpoint_dir", str(stories260k_dir), "--adapter", str(adapter_dir), "--temperature",
              "0", "--max_new_tokens", "20"]
    code, _, err = run([*common, "--prompts_file", str(prompts_file), "--output_file", str(out_file),
                        "--batch_size", "3"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in prompts]
    assert len({r["prompt_tokens"] for r in rows}) == 4
    for prompt, row in zip(prompts, rows, strict=True):
        single = run_json([*common, "--prompt", prompt["prompt"], "--input", prompt.get("input", "")], capsys)
        assert row["output"] == single["text"] and row["new_tokens"] == single["new_tokens"]
    assert sorted(p.name for p in out_file.parent.iterdir()) == ["results.jsonl"]  # no temporary file left


def test_batch_file_errors_name_the_line(stories260k_dir, tmp_path, capsys):
    prompts_file = tmp_path / "in.jsonl"
    prompts_file.write_text('{"prompt": "ok"}\n{"input": "no prompt"}\n')
    code, _, err = run(["generate", "--checkpoint_dir", str(stories260k_dir), "--prompts_file", str(prompts_file),
                        "--output_file", str(tmp_path / "out.jsonl")], capsys)
    assert code == 2 and f"{prompts_file}:2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists()


def test_too_long_prompt_is_one_line_error(stories260k_dir, capsys):
    code, out, err = run(["generate", "--checkpoint_dir", str(stories260k_dir), "--prompt", "Once upon a time " * 200],
                         capsys)
    assert code == 2 and out.strip() == ""
    assert err.strip().splitlines() == [err.strip()] and "context is 512" in err


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_bad_image_exits_2_with_one_line_naming_it(stories260k_dir, tmp_path, kind):
    image = tmp_path / "picture.png"
    if kind == "corrupt":
        good = write_image(tmp_path / "good.png", (10, 200, 10))
        image.write_bytes(good.read_bytes()[:60])  # a truncated PNG
    result = subprocess.run(
        [sys.executable, "-m", "lit_adapter.cli", "generate", "--checkpoint_dir", str(stories260k_dir), "--prompt",
         "hi", "--image", str(image)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(image) in lines[0] and lines[0].startswith("error:")
    assert ("not found" if kind == "missing" else "cannot read image") in lines[0]


def load_tokenizer_ids(checkpoint_dir: Path, text: str) -> list[int]:
    from lit_adapter.tokenizer import Tokenizer

    return Tokenizer(checkpoint_dir / "tokenizer.model").encode(text)


def decode(checkpoint_dir: Path, ids: list[int]) -> str:
    from lit_adapter.tokenizer import Tokenizer

    return Tokenizer(checkpoint_dir / "tokenizer.model").decode(ids)


def test_multimodal_adapter_file_single_and_batch(stories260k_dir, tmp_path, capsys):
    """A saved V2 multimodal adapter: --image reaches the model; image and text records batch apart, same results.

    The tiny test CLIP tower has no pretrained weights (random init at load), so every load is seeded alike."""
    adapter = tmp_path / "visual_adapter"
    save_adapter(visual_adapter(load_model(stories260k_dir)), adapter)
    red, blue = write_image(tmp_path / "red.png", (220, 0, 0)), write_image(tmp_path / "blue.png", (0, 0, 220))
    common = ["generate", "--checkpoint_dir", str(stories260k_dir), "--adapter", str(adapter), "--temperature", "0",
              "--max_new_tokens", "15"]

    def single(prompt: str, image=None) -> str:
        torch.manual_seed(0)
        return run_json([*common, "--prompt", prompt, *(["--image", str(image)] if image else [])], capsys)["text"]

    records = [("Describe the image.", red), ("Describe the image.", blue), ("Tell me a story", None),
               ("What colour is it?", red)]
    expected = [single(prompt, image) for prompt, image in records]
    assert expected[0] != expected[1]  # the pixels matter
    prompts_file = tmp_path / "in.jsonl"
    prompts_file.write_text("".join(
        json.dumps({"prompt": p, **({"image": i.name} if i else {})}) + "\n" for p, i in records
    ))
    torch.manual_seed(0)
    code, _, err = run([*common, "--prompts_file", str(prompts_file), "--output_file", str(tmp_path / "out.jsonl")],
                       capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["output"] for r in rows] == expected


def test_official_v1_file(stories260k_dir, tmp_path, capsys):
    """The released V1 layout (flat adapter_query [L*K, dim] + per-layer raw gates) through load_adapter_model."""
    from lit_adapter.adapters import AdapterConfig, build_adapter_model

    generator = torch.Generator().manual_seed(1)
    query = torch.randn(3 * 10, 64, generator=generator)
    gates = {i: torch.rand(1, 8, 1, 1, generator=generator) for i in range(5)}
    official = tmp_path / "adapter_v1.pth"
    torch.save({"adapter_query.weight": query, **{f"layers.{i}.attention.gate": g for i, g in gates.items()}}, official)
    record = run_json(["generate", "--checkpoint_dir", str(stories260k_dir), "--adapter", str(official), "--prompt",
                       "Tell me a story", "--temperature", "0", "--max_new_tokens", "20"], capsys)

    reference = build_adapter_model(stories260k_dir, AdapterConfig.v1(adapter_layers=3, gate_activation="identity"))
    with torch.no_grad():
        for j, layer in enumerate(range(2, 5)):  # block j of adapter_query is the prompt of layer N-L+j
            reference.llama.layers[layer].attention.adaption_prompt.prompt.copy_(query[10 * j : 10 * (j + 1)])
            reference.llama.layers[layer].attention.adaption_prompt.gate.copy_(gates[layer])
    ids = load_tokenizer_ids(stories260k_dir, get_prompt_style("alpaca").apply("Tell me a story"))
    expected = decode(stories260k_dir, list(generate_tokens(reference.llama, torch.tensor(ids), 20, eos_id=2)))
    assert record["prompt_tokens"] == len(ids) and record["text"] == expected


def test_clip_weights_and_the_multi_turn_styles_through_the_command(stories260k_dir, adapter_dir, tmp_path, capsys):
    code, _, err = run(["generate", "--checkpoint_dir", str(stories260k_dir), "--adapter", str(adapter_dir),
                        "--prompt", "Hi", "--clip_weights", str(tmp_path / "missing.pt")], capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"error: --clip_weights {tmp_path / 'missing.pt'}: file not found (a local open_clip or OpenAI CLIP weights "
        "file: .pt, .pth, .bin, .safetensors)"]
    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps([{"role": "user", "content": "Hi"}]))
    common = ["generate", "--checkpoint_dir", str(stories260k_dir), "--adapter", str(adapter_dir), "--temperature",
              "0", "--max_new_tokens", "6"]
    # the adapter's alpaca in its multi-turn form: one user message is the single-turn prompt itself
    answered, prompted = (run_json([*common, *extra], capsys) for extra in (["--messages", str(messages)],
                                                                           ["--prompt", "Hi"]))
    assert (answered["text"], answered["prompt_tokens"]) == (prompted["text"], prompted["prompt_tokens"])
    code, _, err = run([*common, "--messages", str(messages), "--prompt_style", "raw"], capsys)
    assert code == 2 and "'raw' has no multi-turn form" in err
