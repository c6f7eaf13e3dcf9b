"""Load on `lit-adapter serve`: many streaming clients at once against one client at a time, on CPU.

The benchmark LLaMA (random init, written once as our checkpoint folder with a word-level tokenizer.json of its
vocabulary) is served by the real command in its own process. Clients are the official `openai` async client,
streaming greedy `/v1/completions` of random prompts; every answer's new tokens come from its usage chunk.

    python -m benchmarks.serve                      # 32 clients, 1,000 requests
    python -m benchmarks.serve --requests 200 --json out.json

Figures: aggregate new tokens/s with `--clients` concurrent clients against one client at a time (`--serial`
requests, same prompts and lengths), time to first token (first text piece) p50/p99 of each, failed requests, and
the server's resident memory after the first `--clients` requests and at the end (its growth must stay under 5%).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks import harness

WORD = "w{}"  # the tokenizer's word for id i (ids 0-2: <unk>, <s>, </s>)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_args(parser)
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=1000, help="requests of the concurrent phase, in all")
    parser.add_argument("--serial", type=int, default=12, help="requests of the one-client-at-a-time phase")
    parser.add_argument("--prompt_len", type=int, default=32, help="prompt words (one token each)")
    parser.add_argument("--new_tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--prompts", type=int, default=64, help="distinct random prompts, used in turn")
    parser.add_argument("--max_batch_size", type=int, default=32, help="the server's --max_batch_size")
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if min(args.clients, args.requests, args.serial, args.prompt_len, args.new_tokens, args.prompts) < 1:
        parser.error("--clients, --requests, --serial, --prompt_len, --new_tokens and --prompts must be at least 1")
    return args


# ---- the served model ----


def write_model(args: argparse.Namespace, folder: Path) -> Path:
    """The benchmark LLaMA as our checkpoint folder, with a word-level tokenizer over its whole vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from lit_adapter.checkpoint import save_checkpoint
    from lit_adapter.model import LLaMA

    config = harness.model_config(args, args.prompt_len + args.new_tokens + 16)
    torch.manual_seed(0)
    model = LLaMA(config)
    model.reset_parameters()
    save_checkpoint(folder, model.state_dict(), config, tokenizer=None)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{WORD.format(i): i for i in range(3, args.vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "unk_token": "<unk>"}))
    return folder


def make_prompts(args: argparse.Namespace) -> list[str]:
    rng = random.Random(0)
    return [" ".join(WORD.format(rng.randrange(3, args.vocab_size)) for _ in range(args.prompt_len))
            for _ in range(args.prompts)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args: argparse.Namespace, checkpoint: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LIT_ADAPTER_API_KEY", None)
    command = [sys.executable, "-m", "lit_adapter.cli", "serve", "--checkpoint_dir", str(checkpoint), "--port",
               str(port), "--model_name", "bench", "--max_batch_size", str(args.max_batch_size), "--max_queue",
               str(max(args.clients, args.requests)), "--log_level", "warning"]
    return subprocess.Popen(command, cwd=harness.REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_ready(process: subprocess.Popen, url: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer within {timeout:.0f} s")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---- the clients ----


async def one_request(client: Any, prompt: str, new_tokens: int) -> dict[str, Any]:
    """One streaming completion: its time to first text piece, duration and new tokens (or its error)."""
    start = time.perf_counter()
    first: Optional[float] = None
    tokens: Optional[int] = None
    try:
        stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=new_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as err:  # any failure counts against the server
        return {"error": f"{type(err).__name__}: {err}"}
    if tokens is None:
        return {"error": "no usage chunk"}
    return {"ttft": first if first is not None else time.perf_counter() - start, "tokens": tokens,
            "seconds": time.perf_counter() - start}


async def serial_phase(url: str, prompts: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    import openai

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600) as client:
        return [await one_request(client, prompts[i % len(prompts)], args.new_tokens) for i in range(args.serial)]


async def concurrent_phase(url: str, prompts: list[str], args: argparse.Namespace, pid: int) -> dict[str, Any]:
    """`--clients` clients, each sending its next request as soon as its last one ended, `--requests` in all."""
    import openai

    results: list[dict[str, Any]] = []
    memory: dict[str, float] = {}
    counter = iter(range(args.requests))

    async def worker(client: Any) -> None:
        for index in counter:
            results.append(await one_request(client, prompts[index % len(prompts)], args.new_tokens))
            if len(results) == args.clients:
                memory["after_first"] = rss_mb(pid)

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(args.clients)))
        seconds = time.perf_counter() - start
    memory["end"] = rss_mb(pid)
    return {"results": results, "seconds": seconds, "memory": memory}


# ---- figures ----


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summary(name: str, results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    good = [r for r in results if "error" not in r]
    ttfts = [r["ttft"] for r in good]
    tokens = sum(r["tokens"] for r in good)
    return {"mode": name, "requests": len(results), "failed": len(results) - len(good), "new_tokens": tokens,
            "tokens_per_sec": tokens / seconds, "ttft_p50_ms": 1000 * percentile(ttfts, 50),
            "ttft_p99_ms": 1000 * percentile(ttfts, 99), "seconds": seconds,
            "errors": sorted({r["error"] for r in results if "error" in r})[:5]}


COLUMNS = [
    ("mode", "clients", str), ("requests", "requests", harness.fmt_number()),
    ("failed", "failed", harness.fmt_number()), ("tokens_per_sec", "new tokens/s", harness.fmt_number(1)),
    ("ttft_p50_ms", "TTFT p50 (ms)", harness.fmt_number()), ("ttft_p99_ms", "TTFT p99 (ms)", harness.fmt_number()),
]


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    machine = harness.machine_info()
    with tempfile.TemporaryDirectory(prefix="lit-adapter-serve-bench-") as tmp:
        checkpoint = write_model(args, Path(tmp) / "model")
        prompts = make_prompts(args)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = start_server(args, checkpoint, port)
        try:
            wait_ready(process, url)
            asyncio.run(serial_phase(url, prompts, argparse.Namespace(**{**vars(args), "serial": 2})))  # warm up
            start = time.perf_counter()
            serial = asyncio.run(serial_phase(url, prompts, args))
            serial_row = summary("1 (one at a time)", serial, time.perf_counter() - start)
            concurrent = asyncio.run(concurrent_phase(url, prompts, args, process.pid))
            concurrent_row = summary(f"{args.clients} concurrent", concurrent["results"], concurrent["seconds"])
        finally:
            process.terminate()
            process.wait(timeout=60)
    memory = concurrent["memory"]
    growth = memory["end"] / memory["after_first"] - 1 if memory.get("after_first") else float("nan")
    speedup = harness.ratio(concurrent_row["tokens_per_sec"], serial_row["tokens_per_sec"])
    print(harness.format_table([serial_row, concurrent_row], COLUMNS))
    print()
    print(f"aggregate throughput: {harness.fmt_ratio(speedup)} one client at a time (goal: >= 3x); "
          f"failed requests: {concurrent_row['failed'] + serial_row['failed']}")
    print(f"server resident memory: {memory.get('after_first', float('nan')):.0f} MiB after the first "
          f"{args.clients} requests, {memory['end']:.0f} MiB after {args.requests} ({100 * growth:+.1f}%; "
          "goal: within 5%)")
    for row in (serial_row, concurrent_row):
        for error in row["errors"]:
            print(f"note: {row['mode']}: {error}")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, server threads {args.threads}, load average "
          f"{machine['load_average']}")
    if args.json:
        harness.write_json(Path(args.json), {"args": vars(args), "machine": machine, "serial": serial_row,
                                             "concurrent": concurrent_row, "speedup": speedup,
                                             "memory_mb": memory, "memory_growth": growth})


if __name__ == "__main__":
    main()
