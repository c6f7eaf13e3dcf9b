"""Multi-turn chat in the adapter's own template (a single-turn one in its multi-turn form), the V2 chat template or
the checkpoint's own; history kept within the context window; /image, the ImageBind-LLM inputs (/audio, /video,
/depth, /thermal, /imu, /point), /reset, /exit; and the prompt that answers an OpenAI-style conversation
(`generate --messages`, the server)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, TextIO

import torch

from lit_adapter.chat_template import Message, read_messages  # noqa: F401  (read_messages: for the commands)
from lit_adapter.errors import LitAdapterError
from lit_adapter.images import check_image
from lit_adapter.inference.engine import Completion, Decoding, Engine, ExpertSlot, with_context
from lit_adapter.inference.experts import Expert
from lit_adapter.media import INPUT_KINDS
from lit_adapter.prompts import CHAT, CHAT_TEMPLATE, PromptStyle, multi_turn_form

HELP = "commands: /image PATH (talk about an image), /reset (forget the conversation), /exit"
# ImageBind-LLM adapters take every input kind, each PATH or PATH:WEIGHT (the inputs are mixed by weight)
BIND_HELP = ("commands: /image, /video, /audio, /depth, /thermal, /imu, /point PATH[:WEIGHT] (mixed by weight), "
             "/reset, /exit")


@dataclass(eq=False)
class ChatSession:
    """A conversation with an engine whose prompt style is multi-turn (chat, or the checkpoint's chat_template);
    replies stream to `out`, notices to `err`."""

    engine: Engine
    decoding: Decoding
    system: Optional[str] = None
    expert: Optional[Expert] = None
    expert_slot: ExpertSlot = "input"
    generator: Optional[torch.Generator] = None
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    # the conversation so far: set by reset()
    turns: list[tuple[str, str]] = field(init=False)
    image: Optional[Path] = field(init=False)
    visual: Optional[torch.Tensor] = field(init=False)
    pending_context: str = field(init=False)  # the expert's text about a new image, added to the next message
    media: dict[str, str] = field(init=False)  # ImageBind-LLM: kind -> "PATH[:WEIGHT]" of the inputs in use

    def __post_init__(self) -> None:
        require_multi_turn(self.engine.style)
        self.reset()

    def reset(self) -> None:
        self.turns = []
        self.image = None
        self.visual = None
        self.pending_context = ""
        self.media = {}

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the chat should end."""
        line = line.strip()
        if not line:
            return True
        if line == "/exit":
            return False
        if line == "/reset":
            self.reset()
            self.notice("conversation reset")
        elif line.split()[0] in (f"/{kind}" for kind in INPUT_KINDS):
            kind, _, spec = line[1:].partition(" ")
            if self.engine.binds:
                self.set_input(kind, spec.strip())
            elif kind == "image":
                self.set_image(spec.strip())
            else:
                self.notice(f"error: /{kind} needs an ImageBind-LLM adapter (this one takes only /image)")
        elif line.startswith("/") and line.split()[0] in ("/help", "/?"):
            self.notice(BIND_HELP if self.engine.binds else HELP)
        else:
            self.reply(line)
        return True

    def set_image(self, path: str, strict: bool = False) -> None:
        """Talk about the image at `path` from now on; a bad image is a notice (strict: raised)."""
        if not path:
            self.notice("usage: /image PATH")
            return
        try:
            image = check_image(Path(path).expanduser())
            if self.expert is None and not self.engine.multimodal:
                raise LitAdapterError(f"{image}: this model has no visual encoder; start the chat with --expert")
            context = self.expert(image) if self.expert is not None else ""
            visual = self.engine.visual_tokens([image])
        except LitAdapterError as err:
            if strict:
                raise
            self.notice(f"error: {err}")
            return
        self.image, self.visual, self.pending_context = image, visual, context
        self.notice(f"image {image} loaded")

    def set_input(self, kind: str, spec: str, strict: bool = False) -> None:
        """ImageBind-LLM: use the input `spec` (PATH or PATH:WEIGHT) of `kind` from now on, mixed with the others by
        weight; a bad file is a notice and the inputs stay as they were (strict: raised)."""
        if not spec:
            self.notice(f"usage: /{kind} PATH[:WEIGHT]")
            return
        from lit_adapter.media.inputs import bind_tokens

        media = {**self.media, kind: spec}
        try:
            visual = bind_tokens(self.engine.adapter_model, media, self.engine.device)
        except LitAdapterError as err:
            if strict:
                raise
            self.notice(f"error: {err}")
            return
        self.media, self.visual = media, visual
        self.notice(f"{kind} {spec} loaded ({len(media)} input(s) in use)")

    def reply(self, message: str) -> Optional[str]:
        """Stream the answer to `message` to `out`; it joins the history. None when the message cannot fit."""
        if self.pending_context:
            parts = with_context(message, "", self.pending_context, self.expert_slot)
            message = "\n\n".join(part for part in parts if part)
        ids = self.fit_history(message)
        if ids is None:
            return None
        completion = Completion(prompt_tokens=ids.numel())
        started = False  # the reply's leading space (after "Assistant:") is not shown
        for piece in self.engine.stream(ids, self.decoding, self.visual, self.generator, completion):
            piece = piece if started else piece.lstrip()
            started = started or bool(piece)
            self.out.write(piece)
            self.out.flush()
        self.out.write("\n")
        self.out.flush()
        self.pending_context = ""
        answer = completion.text.strip()
        self.turns.append((message, answer))
        return answer

    def fit_history(self, message: str) -> Optional[torch.Tensor]:
        """Prompt ids for the history plus `message`, dropping the oldest turns until the reply has room."""
        budget = self.engine.context_length - self.decoding.max_new_tokens
        dropped = 0
        while True:
            turns = [*self.turns[dropped:], (message, None)]
            ids = self.engine.encode(self.engine.style.apply_turns(turns, system=self.system))
            if ids.numel() <= budget or dropped == len(self.turns):
                break
            dropped += 1
        if dropped:
            self.turns = self.turns[dropped:]
            self.notice(f"dropped the {dropped} oldest turn(s) to stay within the {self.engine.context_length}-token "
                        "context")
        if ids.numel() >= self.engine.context_length:
            self.notice(f"error: the message is {ids.numel()} tokens with the template, the model's context is "
                        f"{self.engine.context_length}: send a shorter one")
            return None
        return ids

    def notice(self, text: str) -> None:
        print(text, file=self.err, flush=True)


def require_multi_turn(style: PromptStyle) -> None:
    if not style.multi_turn:
        raise LitAdapterError(
            f"prompt style {style.name!r} takes no conversation; use --prompt_style chat, chat_template, alpaca or "
            "alpaca_zh (or its multi-turn form, lit_adapter.prompts.multi_turn_form)"
        )


def conversation_style(engine: Engine) -> PromptStyle:
    """The style a conversation takes when none is chosen: the engine's own (an adapter's template, a single-turn one
    such as alpaca in its multi-turn form); for a style without one (raw: the bare base model) the checkpoint's chat
    template when its tokenizer has one, else `chat`."""
    if engine.style.multi_turn:
        return engine.style
    if engine.adapter_model is not None:
        try:
            return multi_turn_form(engine.style)
        except LitAdapterError:
            pass
    if engine.tokenizer.chat_template is not None:
        return CHAT_TEMPLATE.for_tokenizer(engine.tokenizer)
    return CHAT


def conversation_ids(engine: Engine, messages: Sequence[Message]) -> torch.Tensor:
    """The prompt ids [T] that answer an OpenAI-style conversation in the engine's multi-turn style (the chat
    template's text with its own special tokens, or the chat style's text after BOS)."""
    require_multi_turn(engine.style)
    return engine.encode(engine.style.apply_messages(messages))


def run_chat(session: ChatSession, lines: Iterable[str], interactive: bool = False) -> None:
    """Feed lines (stdin, a pipe, a list) to the session until /exit or the end of the input."""
    if interactive:
        session.notice(HELP)
    for line in prompts(lines, session.err if interactive else None):
        if not session.handle(line):
            break


def prompts(lines: Iterable[str], err: Optional[TextIO]) -> Iterable[str]:
    iterator = iter(lines)
    while True:
        if err is not None:
            print(">> ", end="", file=err, flush=True)
        line = next(iterator, None)
        if line is None:
            return
        yield line
