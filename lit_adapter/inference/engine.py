"""A loaded model ready to answer: base or adapter model, tokenizer, prompt style, decoding settings.

Every command decodes through an `Engine`: `generate` and `chat` (`stream`, `complete`), batch files and evaluation
(`generate_batch`, `score`), so they all load, fold and decode the same way. Each decoding entry runs inside the
engine's CPU decoding context `self.cpu`: process-wide torch settings change only while it is entered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import Tensor

from lit_adapter.checkpoint import load_model, tokenizer_path
from lit_adapter.devices import resolve_device, resolve_dtype
from lit_adapter.errors import LitAdapterError
from lit_adapter.inference.cpu import CPUDecoding
from lit_adapter.inference.cpu_store import default_store
from lit_adapter.inference.experts import Expert
from lit_adapter.inference.generate import generate_batch as decode_batch
from lit_adapter.inference.generate import generate_tokens
from lit_adapter.inference.stream import StopFilter, StreamDecoder, cut_at_stop
from lit_adapter.model import LLaMA
from lit_adapter.prompts import PromptStyle, get_prompt_style
from lit_adapter.tokenizer import Tokenizer

Precision = Literal["auto", "32-true", "bf16-true", "16-true"]
ExpertSlot = Literal["input", "instruction"]
StopRule = Callable[[int, list[int]], bool]  # (row, its new tokens so far) -> whether the row ends here


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 100
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


BASE_DECODING = Decoding()
ADAPTER_DECODING = Decoding(temperature=0.1, top_p=0.75)  # V1 paper
CHAT_DECODING = Decoding(temperature=0.7, top_p=0.95)  # V2 chat demo


def resolve_decoding(
    defaults: Decoding,
    max_new_tokens: int,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop: Sequence[str] = (),
) -> Decoding:
    """`defaults` with every value the user gave put in its place; stop sequences add to the defaults'."""
    if temperature is not None and temperature < 0:
        raise LitAdapterError(f"--temperature {temperature}: must be >= 0 (0 = greedy)")
    if top_p is not None and not 0 < top_p <= 1:
        raise LitAdapterError(f"--top_p {top_p}: must be in (0, 1]")
    if max_new_tokens < 1:
        raise LitAdapterError(f"--max_new_tokens {max_new_tokens}: must be at least 1")
    return replace(
        defaults,
        max_new_tokens=max_new_tokens,
        temperature=defaults.temperature if temperature is None else temperature,
        top_k=top_k if top_k is not None else defaults.top_k,
        top_p=defaults.top_p if top_p is None else top_p,
        stop=tuple(dict.fromkeys([*defaults.stop, *stop])),
    )


@dataclass
class Completion:
    """One generation's text and counts (filled in as the stream is consumed)."""

    prompt_tokens: int
    text: str = ""
    new_tokens: int = 0
    seconds: float = 0.0
    finish: str = "length"  # "eos", "stop" or "length"

    @property
    def tokens_per_sec(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


class Engine:
    """Generation and scoring with a base model (`adapter_model` None) or an adapter model; `llama` is the model
    that runs (the adapter model's, its linears folded by `load`)."""

    def __init__(
        self,
        llama: LLaMA,
        tokenizer: Tokenizer,
        style: PromptStyle,
        adapter_model=None,
        adapter_style: Optional[PromptStyle] = None,
        cpu: Optional[CPUDecoding] = None,
    ) -> None:
        self.llama = llama
        self.tokenizer = tokenizer
        self.style = style
        self.adapter_style = adapter_style or style  # the adapter's own template, e.g. for its captions
        self.adapter_model = adapter_model
        self.device = llama.output.weight.device
        self.dtype = llama.output.weight.dtype
        # entered around every decoding call; a model handed in keeps its layout (no `prepare`)
        self.cpu = cpu if cpu is not None else CPUDecoding.for_model(llama)

    @classmethod
    def load(
        cls,
        checkpoint_dir: Path,
        adapter: Optional[Path] = None,
        device: str = "auto",
        precision: str = "auto",
        merge: bool = True,
        prompt_style: Optional[str] = None,
    ) -> Engine:
        """Base model alone (prompt style `raw`) or with an adapter (the style saved with it, alpaca by default).

        `merge` folds bias/scale and LoRA into plain linears (one matmul per linear while decoding). The CPU decoding
        context is chosen for the loaded model, and its layout choices applied to it.
        """
        dev = resolve_device(device)
        dtype = resolve_dtype(precision, dev)
        tokenizer = Tokenizer(tokenizer_path(checkpoint_dir))
        adapter_model, adapter_style = None, get_prompt_style(prompt_style or "raw")
        if adapter is None:
            llama = load_model(checkpoint_dir, device=dev, dtype=dtype)
        else:
            from lit_adapter.adapters import load_adapter_model
            from lit_adapter.adapters.merge import merge_linears

            adapter_model = load_adapter_model(checkpoint_dir, adapter, device=dev, dtype=dtype)
            if merge:
                merge_linears(adapter_model)
            llama = adapter_model.llama
            adapter_style = get_prompt_style(adapter_model.adapter_config.prompt_style or "alpaca")
        style = get_prompt_style(prompt_style) if prompt_style else adapter_style
        # the checkpoint's own chat template (style chat_template) comes with its tokenizer
        style, adapter_style = style.for_tokenizer(tokenizer), adapter_style.for_tokenizer(tokenizer)
        cpu = CPUDecoding.for_model(llama, store=default_store())  # measured once per machine and model shape
        cpu.prepare(llama)
        return cls(llama, tokenizer, style, adapter_model, adapter_style, cpu)

    @property
    def multimodal(self) -> bool:
        return self.adapter_model is not None and getattr(self.adapter_model, "visual", None) is not None

    @property
    def binds(self) -> bool:
        """Whether the adapter is ImageBind-LLM's: its inputs of every kind go through the bind network."""
        visual = getattr(self.adapter_model, "visual", None)
        return visual is not None and visual.config.mode == "bind"

    @property
    def context_length(self) -> int:
        return self.llama.config.max_seq_len

    def format(self, instruction: str, input: str = "") -> str:
        return self.style.apply(instruction, input)

    def encode(self, text: str) -> Tensor:
        return torch.tensor(self.prompt_ids(text), device=self.device)

    def prompt_ids(self, text: str) -> list[int]:
        # BOS unless the text comes from a chat template, which writes its own
        return self.tokenizer.encode(text, bos=self.style.adds_special_tokens)

    def text(self, tokens: list[int], decoding: Decoding) -> str:
        """The text of generated `tokens`, cut before the first of the decoding's stop sequences."""
        return cut_at_stop(self.tokenizer.decode(tokens), decoding.stop)[0]

    @torch.inference_mode()
    def visual_tokens(self, images: Sequence[Path]) -> Optional[Tensor]:
        """The adapter's visual prompt for each image [B, tokens, dim], computed once per generation; None for a
        model without a visual encoder (its images reach it only as an expert's text)."""
        if not images or not self.multimodal:
            return None
        transform = self.adapter_model.visual.config.transform(train=False)
        from lit_adapter.images import load_images  # PIL: only when there are images

        pixels = load_images(images, transform, self.device, self.dtype)
        return self.adapter_model.encode_images(pixels)

    def stream(self, prompt_ids: Tensor, decoding: Decoding, visual_tokens: Optional[Tensor] = None,
               generator: Optional[torch.Generator] = None, completion: Optional[Completion] = None) -> Iterator[str]:
        """Text pieces as they are generated (stop sequences cut, never shown); counts go into `completion`.

        The CPU decoding context is held from the first piece until the stream is exhausted or closed.
        """
        completion = completion if completion is not None else Completion(prompt_tokens=prompt_ids.numel())
        stops = StopFilter(decoding.stop)
        limit = min(decoding.max_new_tokens, self.context_length - prompt_ids.numel())
        with self.cpu:
            start = time.perf_counter()
            tokens = generate_tokens(
                self.llama, prompt_ids, decoding.max_new_tokens, decoding.temperature, decoding.top_k, decoding.top_p,
                self.tokenizer.stop_ids, visual_tokens=visual_tokens, generator=generator,
            )
            try:
                yield from self._pieces(tokens, stops, completion)
            finally:
                tokens.close()
                completion.seconds = time.perf_counter() - start
                completion.text = stops.text
                completion.finish = "stop" if stops.stopped else "length" if completion.new_tokens >= limit else "eos"

    def _pieces(self, tokens: Iterator[int], stops: StopFilter, completion: Completion) -> Iterator[str]:
        text = StreamDecoder(self.tokenizer)
        for token in tokens:
            completion.new_tokens += 1
            piece = stops.push(text.push(token))
            if piece:
                yield piece
            if stops.stopped:
                return
        tail = stops.push(text.flush()) + stops.flush()
        if tail:
            yield tail

    def complete(self, prompt_ids: Tensor, decoding: Decoding, visual_tokens: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Completion:
        """The whole generation at once (`stream` consumed)."""
        completion = Completion(prompt_tokens=prompt_ids.numel())
        for _ in self.stream(prompt_ids, decoding, visual_tokens, generator, completion):
            pass
        return completion

    def generate_batch(
        self, prompts: Sequence[Tensor], decoding: Decoding, visual_tokens: Optional[Tensor] = None,
        should_stop: Optional[StopRule] = None, generator: Optional[torch.Generator] = None,
    ) -> list[list[int]]:
        """New token ids for each 1-D prompt, decoded together as one left-padded batch.

        A row ends at EOS (not included), at `decoding.max_new_tokens`, once its text holds one of `decoding.stop`
        (the tokens are kept: `text` cuts them) or when `should_stop(row, tokens)` says so. `visual_tokens`
        [B, tokens, dim] has one row per prompt (or one, shared). Greedy results equal `complete`'s one by one.
        """
        stops = decoding.stop

        def stop_rule(row: int, tokens: list[int]) -> bool:
            reached = bool(stops) and cut_at_stop(self.tokenizer.decode(tokens), stops)[1]
            return reached or (should_stop is not None and should_stop(row, tokens))

        with self.cpu:
            return decode_batch(
                self.llama, list(prompts), decoding.max_new_tokens, decoding.temperature, decoding.top_k,
                decoding.top_p, self.tokenizer.stop_ids, visual_tokens=visual_tokens, generator=generator,
                should_stop=stop_rule if stops or should_stop is not None else None,
            )

    @torch.inference_mode()
    def score(
        self, rows: Sequence[list[int]], spans: Sequence[tuple[int, int]], visual_tokens: Optional[Tensor] = None
    ) -> list[float]:
        """Summed log-likelihood of tokens [start, end) of each row, given the tokens before them.

        Args:
            rows: token ids (BOS first) of any lengths; all rows go through one right-padded forward pass.
            spans: per row, the positions [start, end) scored, 1 <= start < end <= len(row).
            visual_tokens: [len(rows), tokens, dim] (or one row, shared), or None.

        Returns:
            One summed log-probability per row.
        """
        width = max(len(ids) for ids in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        scored = torch.zeros(len(rows), width - 1, dtype=torch.bool, device=self.device)
        for row, (ids, (start, end)) in enumerate(zip(rows, spans, strict=True)):
            tokens[row, : len(ids)] = torch.tensor(ids, device=self.device)
            scored[row, start - 1: end - 1] = True  # the logits at t predict token t + 1
        with self.cpu:
            # padding sits after each row, so causal attention keeps it out of the scored positions
            logits = self.llama(tokens, visual_tokens=visual_tokens)[:, :-1].float()  # [B, width - 1, vocab]
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        return torch.where(scored, log_probs, 0.0).sum(dim=-1).tolist()

    def caption(self, image: Path, instruction: str, max_new_tokens: int = 64) -> str:
        """Greedy answer to `instruction` about `image` in the adapter's own template (the self-caption expert)."""
        ids = self.encode(self.adapter_style.apply(instruction))
        decoding = Decoding(max_new_tokens=max_new_tokens, stop=self.adapter_style.stop_sequences)
        return self.complete(ids, decoding, visual_tokens=self.visual_tokens([image])).text


def build_prompt(
    engine: Engine,
    instruction: str,
    input: str = "",
    image: Optional[Path] = None,
    expert: Optional[Expert] = None,
    slot: ExpertSlot = "input",
) -> str:
    """The prompt text in the engine's style; an expert's description of `image` goes in as context.

    An image must be readable; without an expert it must be for a multimodal model (which sees its pixels).
    """
    if image is not None:
        from lit_adapter.images import check_image

        check_image(image)
        if expert is None and not engine.multimodal:
            raise LitAdapterError(
                f"{image}: this model has no visual encoder; use a multimodal adapter or --expert to turn the "
                "image into text"
            )
    context = expert(image) if expert is not None and image is not None else ""
    return engine.format(*with_context(instruction, input, context, slot))


def with_context(instruction: str, input: str, context: str, slot: ExpertSlot) -> tuple[str, str]:
    """Put an expert's text into the prompt: in the input slot (before any user input) or before the instruction."""
    if not context:
        return instruction, input
    if slot == "input":
        return instruction, f"{context}\n{input}" if input else context
    return f"{context}\n{instruction}", input

