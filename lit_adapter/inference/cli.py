"""`lit-adapter generate` and `lit-adapter chat`."""

from __future__ import annotations

import json as jsonlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from lit_adapter.devices import peak_memory_gb
from lit_adapter.errors import LitAdapterError
from lit_adapter.files import write_jsonl
from lit_adapter.inference.batch import generate_records, read_prompts
from lit_adapter.inference.engine import (
    ADAPTER_DECODING,
    BASE_DECODING,
    CHAT_DECODING,
    Completion,
    Decoding,
    Engine,
    ExpertSlot,
    Precision,
    build_prompt,
    resolve_decoding,
)
from lit_adapter.inference.experts import Expert, load_expert

BOOLEAN_FLAGS = ("--json", "--no_merge")
REPEATABLE = ("--stop",)


def read_prompt(prompt: str) -> str:
    return sys.stdin.read().rstrip("\n") if prompt == "-" else prompt


@dataclass
class Session:
    """What `generate` and `chat` share: the loaded engine, its decoding, the expert and the random generator."""

    engine: Engine
    decoding: Decoding
    expert: Optional[Expert]
    expert_slot: ExpertSlot
    generator: torch.Generator


def open_session(
    checkpoint_dir: Path,
    adapter: Optional[Path],
    prompt_style: Optional[str],
    defaults: Decoding,
    max_new_tokens: int,
    expert: Optional[str] = None,
    expert_slot: ExpertSlot = "input",
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop: Optional[list[str]] = None,
    seed: int = 1234,
    no_merge: bool = False,
    precision: Precision = "auto",
    device: str = "auto",
) -> Session:
    """The options of `generate` and `chat` beyond their own (each command passes them on as `**options`).

    Args:
        expert: image -> text expert: caption_file:PATH, self_caption[:ADAPTER_FILE], ocr or module.path:ClassName.
        expert_slot: where the expert's text goes: the prompt's input slot (after a chat message) or before the
            instruction.
        temperature: sampling temperature, 0 = greedy; default: generate 0.1 with an adapter (the paper's), 0
            without; chat 0.7.
        top_k: sample only among the k most likely tokens.
        top_p: nucleus sampling mass; default: generate 0.75 with an adapter (the paper's), 1 without; chat 0.95.
        stop: text that ends a generation (not printed) besides the template's own; repeat the flag for several.
        seed: random seed for sampling.
        no_merge: keep bias/scale and LoRA as separate modules instead of folding them into the weights.
        precision: 32-true, bf16-true or 16-true; auto = bf16-true on a GPU that supports it, else 32-true.
        device: cpu, cuda, cuda:1, ... or auto.
    """
    engine = Engine.load(checkpoint_dir, adapter, device, precision, merge=not no_merge, prompt_style=prompt_style)
    decoding = resolve_decoding(
        replace(defaults, stop=engine.style.stop_sequences), max_new_tokens, temperature, top_k, top_p, stop or ()
    )
    chosen_expert = make_expert(expert, engine, checkpoint_dir, device, precision, not no_merge)
    generator = torch.Generator(device=engine.device).manual_seed(seed)
    return Session(engine, decoding, chosen_expert, expert_slot, generator)


def generate(
    checkpoint_dir: Path,
    adapter: Optional[Path] = None,
    prompt: str = "",
    input: str = "",
    image: Optional[Path] = None,
    prompts_file: Optional[Path] = None,
    output_file: Optional[Path] = None,
    batch_size: int = 8,
    prompt_style: Optional[str] = None,
    max_new_tokens: int = 100,
    json: bool = False,
    **options: Any,
) -> None:
    """Generate text with a base model or an adapter; the text streams to stdout, speed and memory go to stderr.

    Args:
        checkpoint_dir: a folder written by `lit-adapter convert`.
        adapter: an adapter (our `adapter.safetensors` or its folder, or an official V1/V2 `.pth`).
        prompt: the instruction; `-` reads it from stdin; empty starts from BOS alone (base model).
        input: the optional input (context) that goes with the instruction.
        image: an image for a multimodal adapter, or for --expert to describe.
        prompts_file: batch mode: a JSONL file of {"prompt": ..., "input": ..., "image": ...} records.
        output_file: batch mode: where the JSONL results go (written atomically).
        batch_size: batch mode: prompts decoded together.
        prompt_style: alpaca, alpaca_zh, chat or raw; default: the adapter's own style, raw for the bare base model.
        max_new_tokens: the most tokens to generate.
        json: print one JSON object (text, token counts, tokens/s) instead of streaming text.
        options: expert, sampling, seed, merging, precision and device (see `open_session`).
    """
    if prompts_file is not None and output_file is None:
        raise LitAdapterError(f"{prompts_file}: batch mode needs --output_file for the results")
    if output_file is not None and prompts_file is None:
        raise LitAdapterError(f"{output_file}: --output_file is for batch mode; give --prompts_file too")
    defaults = ADAPTER_DECODING if adapter is not None else BASE_DECODING
    session = open_session(checkpoint_dir, adapter, prompt_style, defaults, max_new_tokens, **options)
    engine = session.engine
    if prompts_file is not None:
        rows = generate_records(engine, read_prompts(prompts_file), session.decoding, batch_size, session.expert,
                                session.expert_slot, session.generator, where=str(prompts_file))
        write_jsonl(rows, output_file)
        print(f"{len(rows)} results written to {output_file}", file=sys.stderr)
        return
    if session.expert is not None and image is None:
        raise LitAdapterError(f"--expert {options.get('expert')}: needs an --image to describe")
    text = build_prompt(engine, read_prompt(prompt), input, image, session.expert, session.expert_slot)
    ids = engine.encode(text)
    visual = engine.visual_tokens([image] if image is not None else [])
    completion = Completion(prompt_tokens=ids.numel())
    for piece in engine.stream(ids, session.decoding, visual, session.generator, completion):
        if not json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if json:
        print(jsonlib.dumps(completion_record(completion, engine.device), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    print(speed_line(completion, engine.device), file=sys.stderr)


def chat(
    checkpoint_dir: Path,
    adapter: Optional[Path] = None,
    image: Optional[Path] = None,
    prompt_style: str = "chat",
    system: str = "",
    max_new_tokens: int = 256,
    **options: Any,
) -> None:
    """Multi-turn chat on stdin/stdout (works with a pipe); commands: /image PATH, /reset, /exit.

    Replies stream to stdout; notices (dropped history, errors) go to stderr. The oldest turns are dropped when the
    conversation no longer fits the model's context.

    Args:
        checkpoint_dir: a folder written by `lit-adapter convert`.
        adapter: an adapter (our `adapter.safetensors` or its folder, or an official V1/V2 `.pth`).
        image: an image to talk about from the start (as `/image PATH`).
        prompt_style: a style with a multi-turn form (chat: system line, Human/Assistant roles, "###").
        system: replaces the chat template's system line (empty: the template's own).
        max_new_tokens: the most tokens per reply (also the room kept free in the context).
        options: expert, sampling, seed, merging, precision and device (see `open_session`).
    """
    from lit_adapter.inference.chat import ChatSession, run_chat

    session = open_session(checkpoint_dir, adapter, prompt_style, CHAT_DECODING, max_new_tokens, **options)
    chat_session = ChatSession(session.engine, session.decoding, system or None, session.expert, session.expert_slot,
                               session.generator)
    if image is not None:
        chat_session.set_image(str(image))
    run_chat(chat_session, sys.stdin, interactive=sys.stdin.isatty())


def make_expert(
    spec: Optional[str], engine: Engine, checkpoint_dir: Path, device: str, precision: str, merge: bool
) -> Optional[Expert]:
    if spec is None:
        return None

    def caption_engine(adapter_file: Path):
        return Engine.load(checkpoint_dir, adapter_file, device, precision, merge=merge).caption

    return load_expert(spec, captioner=engine.caption if engine.multimodal else None, captioner_factory=caption_engine)


def completion_record(completion: Completion, device: torch.device) -> dict:
    return {
        "text": completion.text,
        "prompt_tokens": completion.prompt_tokens,
        "new_tokens": completion.new_tokens,
        "finish": completion.finish,
        "seconds": round(completion.seconds, 4),
        "tokens_per_sec": round(completion.tokens_per_sec, 2),
        "peak_memory_gb": round(peak_memory_gb(device), 3),
    }


def speed_line(completion: Completion, device: torch.device) -> str:
    return (f"{completion.new_tokens} tokens in {completion.seconds:.2f} s: {completion.tokens_per_sec:.1f} tokens/s, "
            f"peak memory {peak_memory_gb(device):.2f} GB")


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """Let `--json` / `--no_merge` stand alone as flags and `--stop` repeat (each value taken verbatim)."""
    out: list[str] = []
    repeated: dict[str, list[str]] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, has_value, value = arg.partition("=")
        if name in REPEATABLE:
            if not has_value:
                if i + 1 >= len(args):
                    raise LitAdapterError(f"{name} needs a value")
                i, value = i + 1, args[i + 1]
            repeated.setdefault(name, []).append(value)
        elif arg in BOOLEAN_FLAGS and (i + 1 >= len(args) or args[i + 1].lower() not in ("true", "false")):
            out += [arg, "true"]
        else:
            out.append(arg)
        i += 1
    for name, values in repeated.items():
        out += [name, jsonlib.dumps(values)]
    return out


def _run(function, argv: Sequence[str], name: str) -> None:
    from jsonargparse import CLI

    CLI(function, args=normalize_argv(argv), prog=f"lit-adapter {name}", as_positional=False)


def generate_main(argv: Sequence[str]) -> None:
    _run(generate, argv, "generate")


def chat_main(argv: Sequence[str]) -> None:
    _run(chat, argv, "chat")
