"""Opt-in CPU decoding: settings measured on the running machine, held only inside `with CPUDecoding(...)`.

Decoding on a CPU is a stream of few-row matrix products and microsecond elementwise ops. Which settings make it
fastest depends on the processor (its vector units and caches, hence the kernels oneDNN and MKL pick for it), on
the model's shapes and dtype, and on how busy the cores are, so none is fixed here. `CPUDecoding.for_model` times
the candidates of each setting on this machine with the model itself (its whole decode step, or its own weight
shapes; a few repetitions, `lit_adapter.ops.best_time`), once per process and model shape, and keeps a candidate
only when it is faster than torch's default by more than `TOLERANCE` in every round:

- threads (process-wide, `torch.set_num_threads`): one thread or torch's default. Every parallel op waits for all
  its threads; for a small model whose ops take microseconds the wait can cost more than the parallel work saves,
  and far more when other processes hold cores. One thread is kept only when the model's decode step is faster
  with it for one and for eight rows alike.
- one-row kernels (process-wide, `torch.backends.mkldnn.enabled`): oneDNN off around the forward pass of a single
  token, so its matrix-vector products run through torch's own or BLAS kernels, which can beat oneDNN's for one
  row; oneDNN is kept for prefill and batch steps, where it tends to be far ahead.
- column-major weights (model-local, `prepare`): the linear weights [out, in] laid out transposed in memory (same
  values, shape and parameter), which some BLAS matrix-vector kernels read faster.
  These two interact, so the four combinations are timed together on the model's whole decode step: the one-row
  step plus the eight-row step divided by eight, since one layout serves both.
- float32 products (per step, `Float32Products`): a half-precision linear computed as `linear(x.float(),
  w.float()).to(half)` (the same products, summed in float32 as a half-precision kernel sums them) for the weight
  shapes and row counts where that is faster. A processor without half-precision vector instructions runs bf16
  products through slow emulation, several times slower than float32 ones plus the conversion; one with them
  (AVX512-BF16, AMX) keeps its native kernels. Timed per weight shape at 1, 8 and 64 rows.

A measurement reflects the machine as it is at that moment (a core held by another process favours one thread).
The attention kernel is chosen apart from these, for every caller, by `lit_adapter.ops.AttentionPaths`. No library
function changes torch's process-wide settings otherwise: `generate_tokens` and `generate_batch` run with torch's
defaults unless called inside an entered `CPUDecoding`, which restores every setting on exit (errors and closed
generators included). Commands keep the measured settings between runs (`lit_adapter.inference.cpu_store`).
Measured figures: benchmarks/README.md.

    decoding = CPUDecoding.for_model(llama)  # measured once per process; a no-op context off the CPU
    decoding.prepare(llama)                  # the model-local choice: weight layout
    with decoding:                           # the process-wide choices hold only inside
        tokens = list(generate_tokens(llama, prompt, 100))
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Optional, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lit_adapter.model import LLaMA
from lit_adapter.ops import TOLERANCE, best_time, fastest

Shape = tuple[int, int]  # (out_features, in_features) of a linear weight
RowClass = int  # the rows of a linear's input, as the nearest of ROW_CLASSES
Settings = tuple[Optional[int], bool, frozenset[Shape], frozenset[tuple[Shape, RowClass]]]
T = TypeVar("T")

BATCH_ROWS = 8  # the batch decode step the probes time besides a one-row step
PROBE_MAX_STEP = 0.25  # seconds: a model whose one-row decode step takes longer keeps the default kernels/layout
ROW_CLASSES = (1, BATCH_ROWS, 64)  # a token, a batch decode step, a prefill: where float32 products are timed
HALF = (torch.bfloat16, torch.float16)

_ACTIVE: list[CPUDecoding] = []  # entered contexts, innermost last
_PROBED: dict[tuple, Settings] = {}  # per process: model shapes, dtype, threads -> measured settings


class CPUDecoding:
    """CPU decoding settings, applied only while the context is entered (see the module docstring).

    Args:
        threads: torch threads inside the context (None: leave the count as it is).
        one_row_kernels: oneDNN off around each forward pass of a single token (`step`).
        column_major: (out, in) shapes of the linear weights `prepare` lays out column-major.
        float32_products: (weight shape, row class) pairs whose half-precision linears a step computes in float32.
    """

    def __init__(self, threads: Optional[int] = None, one_row_kernels: bool = False,
                 column_major: Collection[Shape] = (),
                 float32_products: Collection[tuple[Shape, RowClass]] = ()) -> None:
        self.threads = threads
        self.one_row_kernels = one_row_kernels
        self.column_major = frozenset(column_major)
        self.float32_products = frozenset(float32_products)
        self._saved: list[tuple[int, bool]] = []

    def __repr__(self) -> str:
        return (f"CPUDecoding(threads={self.threads}, one_row_kernels={self.one_row_kernels}, "
                f"column_major={sorted(self.column_major)}, float32_products={sorted(self.float32_products)})")

    @classmethod
    def for_model(cls, model: nn.Module, store: Optional[Path] = None) -> CPUDecoding:
        """The settings measured faster for `model` (a LLaMA, or an adapter model holding one as `.llama`) on this
        machine, probed once per process for its shapes, dtype and thread count; a no-op context off the CPU.

        `store`: a file keeping measured settings between processes (`lit_adapter.inference.cpu_store`)."""
        llama: LLaMA = getattr(model, "llama", model)
        weight = llama.output.weight
        if weight.device.type != "cpu":
            return cls()
        key = (tuple(sorted(linear_shapes(llama).items())), weight.dtype, torch.get_num_threads())
        if key not in _PROBED:
            _PROBED[key] = probe(llama) if store is None else stored_or_probed(llama, key, store)
        return cls(*_PROBED[key])

    def prepare(self, model: nn.Module) -> int:
        """Apply the model-local settings (the weight layout) to `model`; returns the number of weights changed."""
        return column_major_weights(model, self.column_major) if self.column_major else 0

    def __enter__(self) -> CPUDecoding:
        self._saved.append((torch.get_num_threads(), torch.backends.mkldnn.enabled))
        if self.threads is not None and self.threads != torch.get_num_threads():
            torch.set_num_threads(self.threads)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc_info) -> None:
        threads, mkldnn = self._saved.pop()
        del _ACTIVE[len(_ACTIVE) - 1 - _ACTIVE[::-1].index(self)]
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = mkldnn

    @contextmanager
    def step(self, tokens: torch.Tensor) -> Iterator[None]:
        """Around one forward pass over `tokens` [B, T]: the per-step settings, while this context is entered."""
        if self not in _ACTIVE or tokens.device.type != "cpu":
            yield
            return
        one_row = self.one_row_kernels and tokens.numel() == 1 and torch.backends.mkldnn.enabled
        # the step's linears see B * T rows, the classifier of the last position B
        classes = {row_class(tokens.numel()), row_class(tokens.shape[0])}
        products = frozenset(pair for pair in self.float32_products if pair[1] in classes)
        with mkldnn_enabled(False) if one_row else nullcontext(), \
                Float32Products(products) if products else nullcontext():
            yield


class Float32Products(TorchFunctionMode):
    """While entered: half-precision `F.linear` calls whose (weight shape, row class) is chosen run in float32."""

    def __init__(self, chosen: Collection[tuple[Shape, RowClass]]) -> None:
        super().__init__()
        self.chosen = frozenset(chosen)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[0].dtype in HALF:
            x, weight, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            if (tuple(weight.shape), row_class(x.numel() // x.shape[-1])) in self.chosen:
                return float32_linear(x, weight, bias)
        return func(*args, **kwargs)


def float32_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear` of half-precision tensors with the products summed in float32, rounded back to x's dtype."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def row_class(rows: int) -> RowClass:
    """The member of ROW_CLASSES nearest to `rows` on a log scale."""
    return min(ROW_CLASSES, key=lambda size: abs(math.log(max(rows, 1) / size)))


def active() -> Optional[CPUDecoding]:
    """The innermost entered CPUDecoding, if any."""
    return _ACTIVE[-1] if _ACTIVE else None


def decode_step(tokens: torch.Tensor) -> AbstractContextManager[None]:
    """Around one forward pass of a decoding loop: the active CPUDecoding's per-step settings, else nothing."""
    context = active()
    return context.step(tokens) if context is not None else nullcontext()


def column_major_weights(model: nn.Module, shapes: Optional[Collection[Shape]] = None) -> int:
    """Lay CPU linear weights [out, in] out transposed in memory: same values, shape and parameter (ties kept).

    `shapes`: the (out, in) shapes to change; None changes every float32 weight. Returns the number changed.
    """
    changed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or weight.device.type != "cpu" or not weight.is_contiguous():
            continue
        if (weight.dtype == torch.float32) if shapes is None else tuple(weight.shape) in shapes:
            weight.data = weight.data.t().contiguous().t()
            changed += 1
    return changed


def linear_shapes(model: nn.Module) -> Counter[Shape]:
    """How many CPU linear weights of each (out, in) shape the model holds."""
    return Counter(tuple(m.weight.shape) for m in model.modules()
                   if isinstance(m, nn.Linear) and m.weight.device.type == "cpu")


@contextmanager
def thread_count(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads != previous:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


@contextmanager
def mkldnn_enabled(enabled: bool) -> Iterator[None]:
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def faster_setting(settings: Sequence[T], measure: Callable[[T], float]) -> T:
    """The first (default) setting, unless another makes `measure(setting)` (seconds) smaller by more than
    TOLERANCE in every round (`lit_adapter.ops.fastest`)."""
    return fastest({setting: partial(measure, setting) for setting in settings}, TOLERANCE, timer=call)


def call(measure: Callable[[], float]) -> float:
    return measure()


def stored_or_probed(llama: LLaMA, key: tuple, store: Path) -> Settings:
    """The thread count measured now (it depends on how busy the cores are at this moment); the kernel, layout and
    float32 choices for it as stored for this machine, else measured now and stored."""
    from lit_adapter.inference import cpu_store

    threads = probe_threads(llama)
    entry = cpu_store.entry_key((*key, threads))
    choices = None if cpu_store.measure_again() else cpu_store.read(store, entry)
    if choices is None:
        choices = probe_for_threads(llama, threads)
        cpu_store.write(store, entry, choices)
    return threads, *choices


@torch.inference_mode()
def probe(llama: LLaMA) -> Settings:
    """Measure (threads, one_row_kernels, column_major, float32_products) for this model on this machine."""
    threads = probe_threads(llama)
    return threads, *probe_for_threads(llama, threads)


@torch.inference_mode()
def probe_for_threads(llama: LLaMA, threads: Optional[int]) -> tuple[bool, frozenset[Shape], frozenset]:
    """(one_row_kernels, column_major, float32_products) measured with `threads` (None: the current count)."""
    with thread_count(threads or torch.get_num_threads()):
        one_row, layout = probe_kernels_and_layout(llama)
        return one_row, layout, probe_float32_products(llama)


def probe_float32_products(llama: LLaMA) -> frozenset[tuple[Shape, RowClass]]:
    """The (weight shape, row class) pairs whose half-precision product is faster computed in float32: each
    distinct linear weight of the model times `F.linear` against `float32_linear` on inputs of each row class."""
    chosen = set()
    weights = {tuple(m.weight.shape): m.weight for m in llama.modules()
               if isinstance(m, nn.Linear) and m.weight.dtype in HALF and m.weight.device.type == "cpu"}
    for shape, weight in weights.items():
        for rows in ROW_CLASSES:
            x = torch.randn(rows, shape[1], dtype=weight.dtype)
            if faster_setting((False, True), partial(product_time, x, weight)):
                chosen.add((shape, rows))
    return frozenset(chosen)


def product_time(x: torch.Tensor, weight: torch.Tensor, in_float32: bool) -> float:
    linear = float32_linear if in_float32 else F.linear
    return best_time(lambda: linear(x, weight), repeats=2, min_seconds=2e-3, budget_seconds=0.05)


def step_time(llama: LLaMA, rows: int) -> float:
    """Seconds of one decode step of the whole model for `rows` sequences of one token (the products and the
    elementwise work decoding runs; attention over a short history costs little beside them)."""
    tokens = torch.zeros(rows, 1, dtype=torch.long, device=llama.output.weight.device)
    rope = llama._rope  # the model's rotation table is rebuilt under inference mode here: keep the model's own
    try:
        return best_time(lambda: llama(tokens, last_only=True), repeats=3, min_seconds=5e-3, budget_seconds=0.2)
    finally:
        llama._rope = rope


def probe_threads(llama: LLaMA) -> Optional[int]:
    """1 when one thread runs the model's decode step faster, at one and at eight rows alike."""
    default = torch.get_num_threads()
    if default == 1:
        return None
    for rows in (1, BATCH_ROWS):

        def timed(threads: int, rows: int = rows) -> float:
            with thread_count(threads):
                return step_time(llama, rows)

        if faster_setting((default, 1), timed) == default:
            return None
    return 1


def probe_kernels_and_layout(llama: LLaMA) -> tuple[bool, frozenset[Shape]]:
    """(one-row kernels, column-major shapes) that make a token cheapest: the model's one-row decode step (oneDNN
    on or off around it) plus its eight-row step divided by eight (oneDNN on), row- or column-major weights. The
    two settings interact (a BLAS matrix-vector kernel may want the other layout than oneDNN), so they are timed
    together. A model whose one-row step is slower than `PROBE_MAX_STEP` keeps the defaults: it is bound by memory
    bandwidth, and the probe would cost more than it could save."""
    shapes = row_major_shapes(llama)
    if step_time(llama, 1) > PROBE_MAX_STEP:
        return False, frozenset()
    mkldnn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    kernels = (False, True) if mkldnn else (False,)
    layouts = ("row", "column") if shapes else ("row",)
    candidates = [(off, layout) for layout in layouts for off in kernels]
    current = ["row"]

    def token_time(candidate: tuple[bool, str]) -> float:
        off, layout = candidate
        if layout != current[0]:
            column_major_weights(llama, shapes) if layout == "column" else row_major_weights(llama, shapes)
            current[0] = layout
        with mkldnn_enabled(mkldnn and not off):
            single = step_time(llama, 1)
        return single + step_time(llama, BATCH_ROWS) / BATCH_ROWS

    try:
        off, layout = faster_setting(candidates, token_time)
    finally:
        if current[0] != "row":
            row_major_weights(llama, shapes)
    return off, shapes if layout == "column" else frozenset()


def row_major_weights(model: nn.Module, shapes: Collection[Shape]) -> int:
    """Undo `column_major_weights` for the weights of `shapes` (a probe's trial layout)."""
    changed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and tuple(weight.shape) in shapes and not weight.is_contiguous():
            weight.data = weight.data.contiguous()
            changed += 1
    return changed


def row_major_shapes(llama: LLaMA) -> frozenset[Shape]:
    """The (out, in) shapes of the model's float32 CPU linear weights that are laid out row-major (contiguous).
    Only float32 products go through the BLAS matrix-vector kernels a layout can help; the half-precision kernels
    (oneDNN's or torch's own) run far slower on a transposed weight, so a bf16 model's trial would cost seconds."""
    return frozenset(tuple(m.weight.shape) for m in llama.modules()
                     if isinstance(m, nn.Linear) and m.weight.device.type == "cpu" and m.weight.is_contiguous()
                     and m.weight.dtype == torch.float32)
