"""The continuous batch on its own: requests joining a running batch at step boundaries (a prompt wider than the
batch shifts it right, a full cache drops the shared padding, the storage grows), leaving it from the middle,
cancelled; every answer equals `Engine.complete` alone (greedy, and seeded sampling with its own generator)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from lit_adapter.inference.engine import Decoding
from lit_adapter.serving.cli import load_engine
from lit_adapter.serving.scheduler import Request, Scheduler


class Collector:
    """A request's sink: its text pieces and its end."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.completion: Any = None
        self.error: Optional[str] = None
        self.done = threading.Event()

    def __call__(self, kind: str, value: Any) -> None:
        if kind == "piece":
            self.pieces.append(value)
        elif kind == "done":
            self.completion = value
            self.done.set()
        else:
            self.error = value
            self.done.set()


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


@pytest.fixture(scope="module")
def engine(stories260k_dir: Path, serve_adapter: Path):
    engine = load_engine(stories260k_dir, serve_adapter, None)
    engine.tokenizer.stop_ids = ()  # no EOS: every generation runs to its length, so the batch stays full
    return engine


def expected(engine, ids: torch.Tensor, decoding: Decoding, seed: Optional[int]):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return engine.complete(ids, decoding, generator=generator)


def test_rows_join_shift_compact_and_leave(engine) -> None:
    context = engine.context_length
    long_prompt = engine.encode(engine.style.apply("Lily and Tom went to the park to play with a big red ball. " * 14))
    jobs = [  # (prompt, decoding, seed, when it joins: after the first job has this many pieces)
        (engine.encode("Once upon a time"), Decoding(max_new_tokens=200), None, 0),
        (long_prompt, Decoding(max_new_tokens=100, temperature=0.8, top_p=0.9), 1, 20),
        (engine.encode("Tom had a dog"), Decoding(max_new_tokens=50, temperature=1.0, top_k=40), 2, 30),
        (engine.encode("The cat"), Decoding(max_new_tokens=200), None, 32),
    ]
    # the long prompt is wider than the batch when it joins (a shift right), and the first row's padding then
    # takes it past the context: its last columns fit only once the padding all rows share is dropped
    assert long_prompt.numel() + 200 - 20 > context and long_prompt.numel() < context - 100
    ids, decoding, seed, after = jobs[3]
    stop = expected(engine, ids, replace(decoding, max_new_tokens=40), seed).text[24:27]
    jobs[3] = (ids, replace(decoding, stop=(stop,)), seed, after)  # a stop string it meets: it leaves early
    references = [expected(engine, ids, decoding, seed) for ids, decoding, seed, _ in jobs]
    assert references[3].finish == "stop" and references[3].new_tokens < 40

    scheduler = Scheduler(engine, max_batch_size=4, max_queue=4)
    scheduler.start()
    try:
        sinks = [Collector() for _ in jobs]
        for (ids, decoding, seed, after), sink in zip(jobs, sinks, strict=True):
            wait_for(lambda after=after: len(sinks[0].pieces) >= after)
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            scheduler.submit(Request(ids, decoding, sink, generator))
        for sink in sinks:
            assert sink.done.wait(120) and sink.error is None, sink.error
    finally:
        scheduler.close()
    for sink, reference in zip(sinks, references, strict=True):
        assert sink.completion.text == reference.text == "".join(sink.pieces)
        assert sink.completion.new_tokens == reference.new_tokens
        assert sink.completion.finish == reference.finish
    moves = scheduler.cache.moves
    assert moves["right"] >= 1 and moves["left"] >= 1 and moves["grown"] >= 2
    assert scheduler.cache.capacity == context  # grown, never past the context, although one row spanned more
    assert scheduler.stats["peak_batch"] == 4 and scheduler.stats["completed"] == 4


def test_cancelled_rows_leave_and_the_others_go_on(engine) -> None:
    decoding = Decoding(max_new_tokens=300)
    prompts = [engine.encode(text) for text in ("Once upon a time", "The dog", "A bird sang")]
    reference = expected(engine, prompts[1], replace(decoding, max_new_tokens=60), None)
    scheduler = Scheduler(engine, max_batch_size=2, max_queue=4)
    scheduler.start()
    try:
        sinks = [Collector() for _ in prompts]
        requests = [Request(ids, replace(decoding, max_new_tokens=60) if i == 1 else decoding, sink)
                    for i, (ids, sink) in enumerate(zip(prompts, sinks, strict=True))]
        for request in requests:
            scheduler.submit(request)  # the third waits: the batch holds two
        wait_for(lambda: len(sinks[0].pieces) >= 5)
        requests[0].cancel()
        requests[2].cancel()
        assert sinks[1].done.wait(60)
        wait_for(lambda: scheduler.stats["cancelled"] == 2 and scheduler.active == 0)
    finally:
        scheduler.close()
    assert sinks[1].completion.text == reference.text
    assert not sinks[0].done.is_set() and len(sinks[0].pieces) < 300
