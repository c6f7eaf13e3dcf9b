"""Every benchmark at a tiny size, in a subprocess as users run it: the report has its fields and sane numbers.

No timing assertions: the figures only have to be positive and finite. The generation benchmark also checks that our
greedy output equals transformers' (and PEFT's, with a V1 adapter) on the same weights in float32.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = ["--vocab_size", "256", "--dim", "64", "--n_layers", "3", "--n_heads", "4", "--hidden_dim", "96"]


def run_benchmark(module: str, *args: str, expect_rc: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == expect_rc, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_train_step(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    proc = run_benchmark(
        "benchmarks.train_step", *TINY_MODEL, "--seq_len", "16", "--batch_size", "2", "--adapter_layers", "2",
        "--lora_rank", "4", "--warmup", "1", "--steps", "2", "--runs", "v1,peft_prompt,v2_lora",
        "--precisions", "bf16", "--json", str(out),
    )
    report = json.loads(out.read_text())
    assert report["benchmark"] == "train_step" and report["machine"]["cores"] >= 1
    results = {r["run"]: r for r in report["results"]}
    assert set(results) == {"v1", "peft_prompt", "v2_lora"}
    for result in results.values():
        assert "error" not in result, result
        for key in ("tokens_per_s", "tokens_per_s_best", "step_s", "peak_rss_mb", "rss_model_mb", "cpu_use"):
            assert positive(result[key]), (result["run"], key, result[key])
        assert len(result["step_s_all"]) == 2
        assert math.isfinite(result["first_loss"]) and math.isfinite(result["last_loss"])
    # the adapters train what the papers say: V1 prompts + per-head gates on 2 layers, PEFT's prompts + one gate each
    assert results["v1"]["trainable_params"] == 2 * (10 * 64 + 4)
    assert results["peft_prompt"]["trainable_params"] == 2 * (10 * 64 + 1)
    assert results["v1"]["trainable_dtypes"] == ["float32"]  # bf16 base, float32 trainable parameters
    assert results["peft_prompt"]["trainable_dtypes"] == ["bfloat16"]
    pairs = {(r["pair"], r["precision"]) for r in report["ratios"]}
    assert pairs == {("v1 / peft_prompt", "bf16"), ("v2_lora / v1", "bf16")}
    for row in report["ratios"]:
        assert positive(row["speed_ratio"]) and positive(row["peak_rss_ratio"])
    assert "v1 / peft_prompt" in proc.stdout  # the printed table


def test_generate_matches_transformers(tmp_path: Path) -> None:
    out = tmp_path / "generate.json"
    run_benchmark(
        "benchmarks.generate", *TINY_MODEL, "--prompt_len", "6", "--new_tokens", "10", "--batch_sizes", "1,4",
        "--adapter_layers", "2", "--warmup", "0", "--repeats", "1", "--precisions", "fp32", "--runs", "ours_v1,peft_v1",
        "--json", str(out),
    )
    report = json.loads(out.read_text())
    assert {r["run"] for r in report["results"]} == {"ours_v1", "peft_v1"}
    for result in report["results"]:
        assert "error" not in result, result
        assert positive(result["peak_rss_mb"])
        for batch, b in result["batches"].items():
            assert b["new_tokens"] == int(batch) * 10
            assert positive(b["tokens_per_s"]) and positive(b["seconds"])
    assert [row["batch"] for row in report["ratios"]] == ["1", "4"]
    for row in report["ratios"]:
        assert positive(row["speed_ratio"])
        assert row["greedy_agreement"] == 1.0, row  # same weights, fp32: the same greedy tokens


def test_gpu_benchmark_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    run_benchmark("benchmarks.gpu", "--device", "cpu", "--tiny", "--runs", "v1,v2_ckpt", "--warmup", "1",
                  "--steps", "1", "--gen_batch_sizes", "1,2", "--gen_repeats", "1", "--json", str(out))
    report = json.loads(out.read_text())
    assert [r["run"] for r in report["training"]] == ["v1", "v2_ckpt"]
    for row in report["training"]:
        for key in ("tokens_per_s", "mfu", "flops_per_token", "peak_memory_gb", "model_memory_gb"):
            assert positive(row[key]), (row["run"], key, row[key])
    assert report["training"][1]["activation_checkpointing"] is True
    assert [(r["run"], r["batch"]) for r in report["generation"]] == [("base", 1), ("base", 2), ("v1", 1), ("v1", 2)]
    for row in report["generation"]:
        assert row["new_tokens"] == row["batch"] * 8 and positive(row["tokens_per_s"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_gpu_benchmark_without_gpu_says_so() -> None:
    proc = run_benchmark("benchmarks.gpu", expect_rc=2)
    assert "no CUDA GPU found" in proc.stderr


def test_startup_times_whole_runs_and_checks_the_texts_agree(stories260k_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "startup.json"
    proc = run_benchmark("benchmarks.startup", "--checkpoint_dir", str(stories260k_dir), "--max_new_tokens", "20",
                         "--rounds", "1", "--wait_idle", "0", "--json", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    assert report["benchmark"] == "startup" and report["texts_agree"]
    assert set(report["seconds"]) == {"ours", "transformers", "import_torch"}
    assert all(positive(value) for values in report["seconds"].values() for value in values)
    assert positive(report["transformers_over_ours"]) and "the base texts agree" in proc.stdout
