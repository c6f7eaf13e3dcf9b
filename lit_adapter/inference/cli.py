"""`lit-adapter generate` and `lit-adapter chat`."""

from __future__ import annotations

import json as jsonlib
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from lit_adapter.devices import peak_memory_gb
from lit_adapter.encoders.joint import CacheSettings
from lit_adapter.errors import LitAdapterError
from lit_adapter.files import write_jsonl
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
    clip_weights: Optional[Path] = None,
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
        clip_weights: a local open_clip / OpenAI CLIP weights file for the adapter's image tower, instead of the one
            its config names (official V2 files name open_clip's `openai` download). The tower is built only when
            an image arrives: text-only use never loads it.
    """
    from lit_adapter.adapters.clip import clip_options

    check_sampling(temperature, top_k, top_p)  # before the model loads: a bad option fails at once
    with clip_options(weights=clip_weights, lazy=True):
        engine = Engine.load(checkpoint_dir, adapter, device, precision, merge=not no_merge,
                             prompt_style=prompt_style)
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
    messages: Optional[Path] = None,
    prompt_style: Optional[str] = None,
    max_new_tokens: int = 100,
    json: bool = False,
    audio: Optional[str] = None,
    video: Optional[str] = None,
    depth: Optional[str] = None,
    thermal: Optional[str] = None,
    imu: Optional[str] = None,
    point: Optional[str] = None,
    encoder_weights: Optional[Path] = None,
    cache_index: Optional[Path] = None,
    cache_size: int = 10,
    cache_t: float = 20.0,
    cache_weight: float = 0.5,
    output_image: Optional[Path] = None,
    unclip_dir: Optional[Path] = None,
    unclip_steps: int = 20,
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
        messages: a JSON file of OpenAI-style messages [{"role": "system"|"user"|"assistant", "content": ...}] to
            answer (instead of --prompt); default style: the adapter's own (a single-turn one in its multi-turn
            form); without an adapter the checkpoint's chat template (chat_template), else chat.
        prompt_style: alpaca, alpaca_zh, chat, chat_official (chat with the official 65B demo's seeded example
            exchange), raw or chat_template (the checkpoint's own Hugging Face template); default: the adapter's own
            style (chat for the official 65B chat files), raw for the bare base model.
        max_new_tokens: the most tokens to generate.
        json: print one JSON object (text, token counts, tokens/s) instead of streaming text.
        audio: (ImageBind-LLM) an audio file (wav, flac, mp3), PATH or PATH:WEIGHT; --image (an image or a video)
            and --video, --depth, --thermal, --imu, --point take the same form; the inputs are mixed by weight.
        encoder_weights: (ImageBind-LLM) the ImageBind weights (imagebind_w3D.pth) the adapter's encoder loads.
        cache_index: (ImageBind-LLM) embeddings to retrieve from: a .safetensors [N, 1024] matrix or a faiss index.
        cache_size: retrieval: how many neighbours.
        cache_t: retrieval: the softmax temperature over their scores.
        cache_weight: retrieval: the share of the retrieved embedding in the result.
        output_image: (ImageBind-LLM) also draw an image from the inputs' embeddings, with Stable unCLIP.
        unclip_dir: the local folder of the Stable unCLIP image-variation pipeline (for --output_image).
        unclip_steps: its denoising steps (the pipeline's default 20).
        options: expert, sampling, seed, merging, precision and device (see `open_session`).
    """
    if prompts_file is not None and output_file is None:
        raise LitAdapterError(f"{prompts_file}: batch mode needs --output_file for the results")
    if output_file is not None and prompts_file is None:
        raise LitAdapterError(f"{output_file}: --output_file is for batch mode; give --prompts_file too")
    if messages is not None and (prompt or input or prompts_file is not None):
        raise LitAdapterError(f"--messages {messages}: the conversation is the prompt; leave out --prompt, --input "
                              "and --prompts_file")
    defaults = ADAPTER_DECODING if adapter is not None else BASE_DECODING
    cache = CacheSettings(cache_size, cache_t, cache_weight)  # bad settings refused before the model loads
    session = open_session(checkpoint_dir, adapter, prompt_style, defaults, max_new_tokens, **options)
    engine = session.engine
    media = {"image": image, "audio": audio, "video": video, "depth": depth, "thermal": thermal, "imu": imu,
             "point": point}
    bind = prepare_bind(engine, media, encoder_weights, cache_index, cache)
    if messages is not None:
        use_conversation_style(session, explicit=prompt_style is not None)
    if prompts_file is not None:
        from lit_adapter.inference.batch import generate_records, read_prompts  # only batch mode needs it

        rows = generate_records(engine, read_prompts(prompts_file), session.decoding, batch_size, session.expert,
                                session.expert_slot, session.generator, where=str(prompts_file))
        write_jsonl(rows, output_file)
        print(f"{len(rows)} results written to {output_file}", file=sys.stderr)
        return
    if session.expert is not None and image is None:
        raise LitAdapterError(f"--expert {options.get('expert')}: needs an --image to describe")
    visual = None
    if bind:  # ImageBind-LLM sees every input (the image too) through its encoder
        from lit_adapter.media.inputs import bind_tokens

        visual, image = bind_tokens(engine.adapter_model, media, engine.device), None
    if output_image is not None:
        draw_image(engine, media, bind, read_prompt(prompt), output_image, unclip_dir, session.generator,
                   unclip_steps)
    if messages is not None:
        from lit_adapter.inference.chat import conversation_ids, read_messages

        ids = conversation_ids(engine, read_messages(messages))
    else:
        text = build_prompt(engine, read_prompt(prompt), input, image, session.expert, session.expert_slot)
        ids = engine.encode(text)
    if image is not None:
        visual = engine.visual_tokens([image])
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
    prompt_style: Optional[str] = None,
    system: str = "",
    max_new_tokens: int = 256,
    encoder_weights: Optional[Path] = None,
    cache_index: Optional[Path] = None,
    cache_size: int = 10,
    cache_t: float = 20.0,
    cache_weight: float = 0.5,
    **options: Any,
) -> None:
    """Multi-turn chat on stdin/stdout (works with a pipe), in the adapter's own template.

    Commands: /image PATH, /reset, /exit; with an ImageBind-LLM adapter also /video, /audio, /depth, /thermal, /imu
    and /point, each PATH or PATH:WEIGHT.

    Replies stream to stdout; notices (dropped history, errors) go to stderr. The oldest turns are dropped when the
    conversation no longer fits the model's context.

    Args:
        checkpoint_dir: a folder written by `lit-adapter convert`.
        adapter: an adapter (our `adapter.safetensors` or its folder, or an official V1/V2 `.pth`).
        image: an image to talk about from the start (as `/image PATH`).
        prompt_style: alpaca, alpaca_zh (earlier turns written in the template's own format), chat (system line,
            Human/Assistant roles, "###"), chat_official (chat after the official 65B demo's example exchange) or
            chat_template (the checkpoint's own Hugging Face template); default: the adapter's own style; without
            an adapter the checkpoint's chat template, else chat.
        system: replaces the template's system line (alpaca: its preamble; empty: the template's own).
        max_new_tokens: the most tokens per reply (also the room kept free in the context).
        encoder_weights: (ImageBind-LLM) the ImageBind weights (imagebind_w3D.pth) the adapter's encoder loads.
        cache_index: (ImageBind-LLM) embeddings to retrieve from: a .safetensors [N, 1024] matrix or a faiss index.
        cache_size: retrieval: how many neighbours.
        cache_t: retrieval: the softmax temperature over their scores.
        cache_weight: retrieval: the share of the retrieved embedding in the result.
        options: expert, sampling, seed, merging, precision, device and CLIP weights (see `open_session`).
    """
    from lit_adapter.inference.chat import ChatSession, run_chat

    if image is not None:
        from lit_adapter.images import check_image  # PIL: only when an image is given

        check_image(image)  # a bad --image ends the command (exit 2); a bad /image in the chat is only a notice
    cache = CacheSettings(cache_size, cache_t, cache_weight)  # bad settings refused before the model loads
    session = open_session(checkpoint_dir, adapter, prompt_style, CHAT_DECODING, max_new_tokens, **options)
    bind = prepare_bind(session.engine, {}, encoder_weights, cache_index, cache)
    use_conversation_style(session, explicit=prompt_style is not None)
    chat_session = ChatSession(session.engine, session.decoding, system or None, session.expert, session.expert_slot,
                               session.generator)
    if image is not None and bind:
        chat_session.set_input("image", str(image), strict=True)
    elif image is not None:
        chat_session.set_image(str(image), strict=True)
    run_chat(chat_session, sys.stdin, interactive=sys.stdin.isatty())


def use_conversation_style(session: Session, explicit: bool = False) -> None:
    """Switch a session whose style takes no conversations to one that does: a style the user chose (`explicit`)
    to its multi-turn form, else as `conversation_style` says; its stop sequences join the decoding's (a
    single-turn style has none)."""
    from lit_adapter.inference.chat import conversation_style
    from lit_adapter.prompts import multi_turn_form

    style = multi_turn_form(session.engine.style) if explicit else conversation_style(session.engine)
    session.engine.style = style
    session.decoding = replace(session.decoding, stop=tuple(dict.fromkeys([*style.stop_sequences,
                                                                           *session.decoding.stop])))


def check_sampling(temperature: Optional[float], top_k: Optional[int], top_p: Optional[float]) -> None:
    """Refuse sampling values that mean nothing (the engine checks the ranges of temperature and top_p too)."""
    if temperature is not None and not math.isfinite(temperature):
        raise LitAdapterError(f"--temperature {temperature}: must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise LitAdapterError(f"--top_k {top_k}: must be at least 1 (leave it out to sample from every token)")
    if top_p is not None and not 0 < top_p <= 1:  # also refuses nan
        raise LitAdapterError(f"--top_p {top_p}: must be in (0, 1]")


def prepare_bind(engine: Engine, media: dict, encoder_weights: Optional[Path], cache_index: Optional[Path],
                 cache: Optional[CacheSettings] = None) -> bool:
    """For an ImageBind-LLM adapter: attach its encoder (`encoder_weights`) and cache; True. Other models: False,
    and any input only ImageBind-LLM takes is refused."""
    from lit_adapter.media.inputs import bind_visual
    from lit_adapter.media.inputs import prepare_bind as attach

    if not engine.binds:
        extra = [f"--{kind}" for kind, spec in media.items() if spec is not None and kind != "image"]
        extra += ["--encoder_weights"] * bool(encoder_weights) + ["--cache_index"] * bool(cache_index)
        if extra:
            bind_visual(engine.adapter_model, extra[0])  # refused in one line
        return False
    attach(engine.adapter_model.visual, encoder_weights, cache_index, cache)
    return True


def draw_image(engine: Engine, media: dict, bind: bool, prompt: str, output_image: Path,
               unclip_dir: Optional[Path], generator: torch.Generator, steps: int) -> None:
    """The official image output: the pre-normalisation mix of the inputs through Stable unCLIP."""
    from lit_adapter.encoders.unclip import generate_image, image_embedding, load_pipeline
    from lit_adapter.media.inputs import parse_inputs, read_inputs

    inputs = parse_inputs(media)
    if not bind or not inputs or unclip_dir is None:
        raise LitAdapterError(f"--output_image {output_image}: needs an ImageBind-LLM adapter, at least one input "
                              "(--image, --audio, ...) and --unclip_dir (the local Stable unCLIP pipeline folder)")
    visual = engine.adapter_model.visual
    with torch.inference_mode():
        embedding = image_embedding(visual.clip, read_inputs(inputs, engine.device), visual.cache)
    generate_image(load_pipeline(unclip_dir, engine.device), prompt, embedding, output_image, generator,
                   num_inference_steps=steps)
    print(f"image written to {output_image}", file=sys.stderr)


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
    from lit_adapter.arguments import run_function_cli

    run_function_cli(function, normalize_argv(argv), f"lit-adapter {name}")


def generate_main(argv: Sequence[str]) -> None:
    _run(generate, argv, "generate")


def chat_main(argv: Sequence[str]) -> None:
    _run(chat, argv, "chat")
