"""Prompt styles: the text placed before a response, for training and for generation.

Every style turns an instruction (and an optional input) into the prompt the response follows, and splits a
training example into segments marked as prompt (no loss) or response (loss). Styles: `alpaca` (the official
Stanford Alpaca templates, verbatim), `alpaca_zh` (the same templates in Chinese), `chat` (the LLaMA-Adapter V2
chat template: a system line, roles Human/Assistant, separator "###"), `raw` (the text as is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from lit_adapter.errors import LitAdapterError

# (text, supervised): one piece of a training example; supervised pieces carry the loss
Segment = tuple[str, bool]
# (human message, assistant reply); the reply is None (or "") for the turn the model is to answer
Turn = tuple[str, Optional[str]]

# the instruction of a caption sample (official V2 captioning); the self-caption expert asks it too
CAPTION_INSTRUCTION = "Generate caption of this image"
# answer options are lettered (A), (B), ... in ScienceQA prompts and answers
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

CHAT_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class PromptStyle:
    """A template with one form for a bare instruction and one for an instruction paired with an input."""

    name: str
    no_input: str
    with_input: str
    # text that ends a reply during generation (besides EOS)
    stop_sequences: tuple[str, ...] = ()

    def apply(self, instruction: str, input: str = "") -> str:
        """The prompt for `instruction` (and `input`); the response follows it directly."""
        template = self.with_input if input else self.no_input
        return template.format(instruction=instruction, input=input)

    def training_segments(self, instruction: str, input: str, output: str) -> list[Segment]:
        """The prompt (no loss) followed by the response (loss)."""
        return [(self.apply(instruction, input), False), (output, True)]


@dataclass(frozen=True)
class ChatStyle(PromptStyle):
    """`system###Human: message###Assistant: reply###Human: ...###Assistant:` (the official V2 chat format)."""

    system: str = CHAT_SYSTEM
    roles: tuple[str, str] = ("Human", "Assistant")
    separator: str = "###"

    def apply(self, instruction: str, input: str = "") -> str:
        return self.apply_turns([(_join(instruction, input), None)])

    def apply_turns(self, turns: Sequence[Turn], system: Optional[str] = None) -> str:
        """The whole conversation so far; when the last reply is missing it ends with "Assistant:" to be answered."""
        return "".join(text for text, _ in self.conversation_segments(turns, system))

    def conversation_segments(self, turns: Sequence[Turn], system: Optional[str] = None) -> list[Segment]:
        """Segments of a conversation: every assistant reply (with the separator that ends it) is supervised."""
        human, assistant = self.roles
        prompt = (self.system if system is None else system) + self.separator
        segments: list[Segment] = []
        for message, reply in turns:
            prompt += f"{human}: {message}{self.separator}{assistant}:"
            if not reply:
                break
            segments += [(prompt, False), (f" {reply}{self.separator}", True)]
            prompt = ""
        if prompt:
            segments.append((prompt, False))
        return segments

    def training_segments(self, instruction: str, input: str, output: str) -> list[Segment]:
        return self.conversation_segments([(_join(instruction, input), output)])


@dataclass(frozen=True)
class RawStyle(PromptStyle):
    """No template: the instruction (and input, after a blank line) as is."""

    def apply(self, instruction: str, input: str = "") -> str:
        return _join(instruction, input)


def _join(instruction: str, input: str) -> str:
    return f"{instruction}\n\n{input}" if input else instruction


ALPACA = PromptStyle(
    name="alpaca",
    no_input=(
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
    with_input=(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
)

ALPACA_ZH = PromptStyle(
    name="alpaca_zh",
    no_input="下面是一条描述任务的指令。请写出恰当完成该请求的回答。\n\n### 指令:\n{instruction}\n\n### 回答:",
    with_input=(
        "下面是一条描述任务的指令，以及一段提供更多背景信息的输入。请写出恰当完成该请求的回答。\n\n"
        "### 指令:\n{instruction}\n\n### 输入:\n{input}\n\n### 回答:"
    ),
)

CHAT = ChatStyle(name="chat", no_input="", with_input="", stop_sequences=("###",))

RAW = RawStyle(name="raw", no_input="{instruction}", with_input="{instruction}\n\n{input}")

PROMPT_STYLES: dict[str, PromptStyle] = {style.name: style for style in (ALPACA, ALPACA_ZH, CHAT, RAW)}


def get_prompt_style(name: str) -> PromptStyle:
    """The style called `name`; an unknown name fails with the list of known ones."""
    style = PROMPT_STYLES.get(name)
    if style is None:
        raise LitAdapterError(f"unknown prompt style {name!r}; choose one of: {', '.join(PROMPT_STYLES)}")
    return style
