"""Continuous batching: every request in flight is one row of a single KV cache, decoded one token per step.

Design. The model's cache holds rows side by side on one column axis, each row left-padded (`generate.py`'s
`left_pad`, `padded_mask`, `row_positions`): every step writes column `width` for all rows at once. A request joins
at a step boundary: its prompt (with those joining at the same boundary) is prefilled straight into free rows of the
cache, right-aligned on the current `width` (the cache is shifted right first when the prompt is the wider), and its
first token comes from that prefill. A row leaves when it ends (EOS, a stop string, its length) or its client goes
away; the last row moves into its place. When the write column reaches the cache's end, the columns every row
pads are dropped, and the cache grows (never past the model's context) only when that is not enough. The storage
only ever grows, so memory settles once the largest batch has been seen.

Each row keeps its own decoding: sampling settings and random generator (its tokens are sampled from its own row of
logits, so a seeded request draws as `lit-adapter generate --seed` does), stop strings (`StopFilter`), length, and
the text pieces it streams (`StreamDecoder`). Greedy rows give the tokens `Engine.stream` gives one by one.

All model work runs on one thread (`Scheduler`), inside the engine's CPU decoding context while there is work;
requests are handed over through a bounded queue and answer through a callback (`Request.sink`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from lit_adapter.inference.engine import Completion, Decoding, Engine
from lit_adapter.inference.generate import sample
from lit_adapter.inference.stream import StopFilter, StreamDecoder
from lit_adapter.serving.batch_cache import BatchCache


class Overloaded(Exception):
    """The queue of waiting requests is full."""


@dataclass(eq=False)
class Request:
    """One generation: prompt ids [T], its decoding, an optional image (PIL; for an ImageBind-LLM adapter the
    conversation's preprocessed inputs, `serving.media.BindInputs`), encoded on the decoding thread.

    `sink(kind, value)` receives ("piece", text) for each text piece, then ("done", Completion) or ("error",
    message), from the decoding thread. `lstrip` drops the reply's leading whitespace (a chat reply after
    "Assistant:"), as `lit-adapter chat` shows it.
    """

    prompt: Tensor
    decoding: Decoding
    sink: Callable[[str, Any], None]
    generator: Optional[torch.Generator] = None
    image: Any = None
    lstrip: bool = False
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True  # seen at the next step boundary


@dataclass(eq=False)
class _Row:
    """A request being decoded: its text so far and what it feeds next."""

    request: Request
    engine: Engine
    completion: Completion = field(init=False)
    text: StreamDecoder = field(init=False)
    stops: StopFilter = field(init=False)
    limit: int = field(init=False)
    last: int = 0
    started: bool = False
    start: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        prompt_tokens = self.request.prompt.numel()
        self.completion = Completion(prompt_tokens=prompt_tokens)
        self.text = StreamDecoder(self.engine.tokenizer)
        self.stops = StopFilter(self.request.decoding.stop)
        self.limit = min(self.request.decoding.max_new_tokens, self.engine.context_length - prompt_tokens)

    def push(self, token: int) -> bool:
        """Take a sampled token; True when the row has ended (and its answer is sent)."""
        if token in self.engine.tokenizer.stop_ids:
            return self.finish("eos")
        self.completion.new_tokens += 1
        self.emit(self.stops.push(self.text.push(token)))
        if self.stops.stopped:
            return self.finish("stop")
        if self.completion.new_tokens >= self.limit:
            return self.finish("length")
        self.last = token
        return False

    def emit(self, piece: str) -> None:
        if self.request.lstrip and not self.started:
            piece = piece.lstrip()
        if piece:
            self.started = True
            self.request.sink("piece", piece)

    def finish(self, reason: str) -> bool:
        if reason != "stop":
            self.emit(self.stops.push(self.text.flush()) + self.stops.flush())
        self.completion.finish = reason
        self.completion.text = self.stops.text.lstrip() if self.request.lstrip else self.stops.text
        self.completion.seconds = time.perf_counter() - self.start
        self.request.sink("done", self.completion)
        return True


class Scheduler:
    """Runs requests on `engine` in one continuous batch of up to `max_batch_size` rows, on its own thread.

    `submit` queues a request (at most `max_queue` wait; then `Overloaded`); rows join and leave at step
    boundaries. `stats` counts what the health endpoint reports.
    """

    def __init__(self, engine: Engine, max_batch_size: int = 16, max_queue: int = 64) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.cache = BatchCache(engine.llama, max_batch_size)
        self.pending: deque[Request] = deque()
        self.condition = threading.Condition()
        self.closed = False
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "peak_batch": 0, "steps": 0}
        self.thread = threading.Thread(target=self._run, name="lit-adapter-decoding", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        with self.condition:
            if self.closed:
                raise Overloaded("the server is shutting down")
            if len(self.pending) >= self.max_queue:
                raise Overloaded(f"{len(self.pending)} requests are waiting already (--max_queue {self.max_queue})")
            self.pending.append(request)
            self.condition.notify_all()

    @property
    def active(self) -> int:
        return self.cache.rows

    @property
    def queued(self) -> int:
        return len(self.pending)

    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.pending and not self.closed:
                    self.condition.wait()
                if self.closed:
                    break
            with torch.inference_mode(), self.engine.cpu:
                while self.pending or self.cache.rows:
                    if self.closed:
                        break
                    self._iterate()
        for row in list(self.cache.owners):
            row.request.sink("error", "the server is shutting down")
        for request in self.pending:
            request.sink("error", "the server is shutting down")

    def _iterate(self) -> None:
        """One step boundary: drop cancelled rows, admit waiting requests, decode one token for every row."""
        try:
            self._drop_cancelled()
            self._admit()
            if self.cache.rows:
                self._step()
        except Exception as err:  # a fault of ours: the rows in flight fail, the server goes on
            message = f"internal error while decoding ({type(err).__name__}: {err})"
            for row in self.cache.owners:
                self.stats["failed"] += 1
                row.request.sink("error", message)
            self.cache.clear()

    def _drop_cancelled(self) -> None:
        for row in [row for row in self.cache.owners if row.request.cancelled]:
            self.cache.remove(row)
            self.stats["cancelled"] += 1
        with self.condition:
            kept = [request for request in self.pending if not request.cancelled]
            self.stats["cancelled"] += len(self.pending) - len(kept)
            self.pending = deque(kept)

    def _admit(self) -> None:
        joining: list[_Row] = []
        visual: list[Optional[Tensor]] = []
        with self.condition:
            while self.pending and self.cache.rows + len(joining) < self.max_batch_size:
                request = self.pending.popleft()
                joining.append(_Row(request, self.engine))
        for row in list(joining):
            try:
                visual.append(self._visual_tokens(row.request.image))
            except Exception as err:  # an input that passed the checks but fails in the encoder
                joining.remove(row)
                self.stats["failed"] += 1
                row.request.sink("error", f"cannot encode the image or audio input ({type(err).__name__}: {err})")
        if not joining:
            return
        try:
            logits = self.cache.add(joining, [row.request.prompt for row in joining], visual)
        except Exception as err:  # the rows in flight are untouched: only the joining requests fail
            for row in joining:
                self.stats["failed"] += 1
                row.request.sink("error", f"internal error in the prefill ({type(err).__name__}: {err})")
            return
        self.stats["peak_batch"] = max(self.stats["peak_batch"], self.cache.rows)
        self._take(joining, logits)

    def _visual_tokens(self, image: Any) -> Optional[Tensor]:
        if image is None:
            return None
        from lit_adapter.serving.images import visual_tokens

        return visual_tokens(self.engine, image)

    def _step(self) -> None:
        rows: list[_Row] = list(self.cache.owners)
        tokens = torch.tensor([row.last for row in rows], device=self.cache.device)
        logits = self.cache.step(tokens)
        self.stats["steps"] += 1
        self._take(rows, logits)

    def _take(self, rows: Sequence[_Row], logits: Tensor) -> None:
        """Sample each row's next token from its logits row; rows that end leave the batch."""
        for row, token in zip(rows, sample_rows(logits, [row.request for row in rows]), strict=True):
            if row.request.cancelled:
                self.cache.remove(row)
                self.stats["cancelled"] += 1
            elif row.push(token):
                self.cache.remove(row)
                self.stats["completed"] += 1


def sample_rows(logits: Tensor, requests: Sequence[Request]) -> list[int]:
    """The next token of each row: greedy rows by one argmax, sampled rows each with its own settings and
    generator (on its own [1, vocab] row, as a single generation draws)."""
    tokens = logits.float().argmax(dim=-1).tolist()
    for index, request in enumerate(requests):
        d = request.decoding
        if d.temperature > 0:
            tokens[index] = int(sample(logits[index:index + 1], d.temperature, d.top_k, d.top_p, request.generator))
    return tokens
