"""A loaded model ready to answer: base or adapter model, tokenizer, prompt style, image path, decoding settings."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional

import torch

from lit_adapter.checkpoint import load_config, load_model, tokenizer_path
from lit_adapter.devices import resolve_device, resolve_dtype
from lit_adapter.errors import LitAdapterError
from lit_adapter.images import check_image, load_images
from lit_adapter.inference.experts import Expert
from lit_adapter.inference.generate import generate_tokens
from lit_adapter.inference.stream import StopFilter
from lit_adapter.model import LLaMA
from lit_adapter.prompts import PromptStyle, get_prompt_style
from lit_adapter.tokenizer import Tokenizer

Precision = Literal["auto", "32-true", "bf16-true", "16-true"]
ExpertSlot = Literal["input", "instruction"]


SINGLE_THREAD_MAX_DIM = 256


def column_major_weights(model: torch.nn.Module) -> None:
    """For inference on CPU in float32: lay each linear weight [out, in] out transposed in memory (same values, same
    shape, same parameter).

    Decoding one sequence multiplies one row by every weight, and MKL's float32 matrix-vector product reads the
    transposed layout faster: 7.1 -> 2.8 ms for a 32000 x 512 classifier, 10.3 -> 8.6 ms for the 56 products of 8
    layers (dim 512, 2 Zen 4 cores). At 8 to 64 rows the classifier still gains and the layers lose 15-30%, so
    batches run about even. bf16 and GPU kernels gain nothing, so those weights are left as they are.
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or weight.device.type != "cpu":
            continue
        if weight.dtype == torch.float32 and weight.is_contiguous():
            weight.data = weight.data.t().contiguous().t()


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
    """Generation with a base model (`adapter_model` None) or an adapter model; `llama` is the model that runs."""

    def __init__(
        self,
        llama: LLaMA,
        tokenizer: Tokenizer,
        style: PromptStyle,
        adapter_model=None,
        adapter_style: Optional[PromptStyle] = None,
    ) -> None:
        self.llama = llama
        self.tokenizer = tokenizer
        self.style = style
        self.adapter_style = adapter_style or style  # the adapter's own template, e.g. for its captions
        self.adapter_model = adapter_model
        self.device = llama.output.weight.device
        self.dtype = llama.output.weight.dtype

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
        """Base model alone (prompt style `raw`) or with an adapter (the style saved with it, alpaca by default)."""
        dev = resolve_device(device)
        dtype = resolve_dtype(precision, dev)
        if dev.type == "cpu" and load_config(checkpoint_dir).dim <= SINGLE_THREAD_MAX_DIM:
            # decoding a tiny model is a stream of microsecond ops: keeping several threads in step costs more than
            # it saves, and far more when another process holds a core (measured 35x slower on 2 busy cores)
            torch.set_num_threads(1)
        if adapter is None:
            llama = load_model(checkpoint_dir, device=dev, dtype=dtype)
            column_major_weights(llama)
            return cls(llama, Tokenizer(tokenizer_path(checkpoint_dir)), get_prompt_style(prompt_style or "raw"))
        from lit_adapter.adapters import load_adapter_model

        adapter_model, adapter_config = load_adapter_model(checkpoint_dir, adapter, device=dev, dtype=dtype)
        tokenizer = Tokenizer(tokenizer_path(checkpoint_dir))
        adapter_model.eval()
        if merge:
            merge_for_inference(adapter_model)
        column_major_weights(adapter_model.llama)
        adapter_style = get_prompt_style(adapter_config.prompt_style or "alpaca")
        style = get_prompt_style(prompt_style) if prompt_style else adapter_style
        return cls(adapter_model.llama, tokenizer, style, adapter_model, adapter_style)

    @property
    def multimodal(self) -> bool:
        return self.adapter_model is not None and getattr(self.adapter_model, "visual", None) is not None

    @property
    def context_length(self) -> int:
        return self.llama.config.max_seq_len

    def format(self, instruction: str, input: str = "") -> str:
        return self.style.apply(instruction, input)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(text, bos=True), device=self.device)

    @torch.inference_mode()
    def visual_tokens(self, images: Sequence[Path]) -> Optional[torch.Tensor]:
        """The adapter's visual prompt for each image [B, tokens, dim], computed once per generation; None for a
        model without a visual encoder (its images reach it only as an expert's text)."""
        if not images or not self.multimodal:
            return None
        transform = self.adapter_model.visual.config.transform(train=False)
        pixels = load_images(images, transform, self.device, self.dtype)
        return self.adapter_model.encode_images(pixels)

    def stream(
        self,
        prompt_ids: torch.Tensor,
        decoding: Decoding,
        visual_tokens: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        completion: Optional[Completion] = None,
    ) -> Iterator[str]:
        """Text pieces as they are generated (stop sequences cut, never shown); counts go into `completion`."""
        completion = completion if completion is not None else Completion(prompt_tokens=prompt_ids.numel())
        stops = StopFilter(decoding.stop)
        text = self.tokenizer.stream_decoder()
        start = time.perf_counter()
        tokens = generate_tokens(
            self.llama, prompt_ids, decoding.max_new_tokens, decoding.temperature, decoding.top_k, decoding.top_p,
            self.tokenizer.eos_id, visual_tokens=visual_tokens, generator=generator,
        )
        limit = min(decoding.max_new_tokens, self.context_length - prompt_ids.numel())
        try:
            for token in tokens:
                completion.new_tokens += 1
                piece = stops.push(text.push(token))
                if piece:
                    yield piece
                if stops.stopped:
                    break
            else:
                tail = stops.push(text.flush()) + stops.flush()
                if tail:
                    yield tail
        finally:
            tokens.close()
            completion.seconds = time.perf_counter() - start
            completion.text = stops.text
            completion.finish = "stop" if stops.stopped else "length" if completion.new_tokens >= limit else "eos"

    def complete(
        self,
        prompt_ids: torch.Tensor,
        decoding: Decoding,
        visual_tokens: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Completion:
        completion = Completion(prompt_tokens=prompt_ids.numel())
        for _ in self.stream(prompt_ids, decoding, visual_tokens, generator, completion):
            pass
        return completion

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


def merge_for_inference(adapter_model) -> int:
    """Fold bias/scale and LoRA into plain nn.Linear modules (y = W'x + b'), so decoding runs one matmul per linear.

    wk/wv keep their LoRA apart when the adapter's prompts must bypass it (`prompt_kv_lora` False): the prompt
    keys/values would otherwise see the folded LoRA. Returns the number of linears folded.
    """
    from lit_adapter.adapters.linear import AdaptedLinear

    keep_lora = {"wk", "wv"} if not adapter_model.adapter_config.prompt_kv_lora else set()
    folded = 0
    for block in adapter_model.llama.layers:
        for parent in (block.attention, block.feed_forward):
            for name, module in list(parent.named_children()):
                if not isinstance(module, AdaptedLinear) or (name in keep_lora and module.lora_rank):
                    continue
                setattr(parent, name, plain_linear(*module.folded()))
                folded += 1
    return folded


def plain_linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.nn.Linear:
    with torch.device("meta"):
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias.to(weight.dtype), requires_grad=False)
    return linear
