"""Prompt styles: the text placed before a response, for training and for generation.

Every style turns an instruction (and an optional input) into the prompt the response follows, and splits a
training example into segments marked as prompt (no loss) or response (loss). Styles: `alpaca` (the official
Stanford Alpaca templates, verbatim), `alpaca_zh` (the same templates in Chinese), `chat` (the LLaMA-Adapter V2
chat template: a system line, roles Human/Assistant, separator "###"), `raw` (the text as is) and `chat_template`
(the checkpoint's own Hugging Face chat template, rendered as transformers renders it; it is bound to the model's
tokenizer with `for_tokenizer`).

The multi-turn styles (`chat`, `chat_template`) also take whole conversations: turns (human, reply) or OpenAI-style
messages (`apply_messages`, `message_segments`), with the loss on every assistant reply.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Optional, Sequence

from lit_adapter.chat_template import ChatTemplate, Message, assistant_spans, content_text
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
    # whether the tokens get BOS (and, after a training response, EOS) added; a chat template writes its own
    adds_special_tokens: bool = True
    # whether the style takes whole conversations (apply_turns, apply_messages)
    multi_turn: ClassVar[bool] = False

    def for_tokenizer(self, tokenizer: Any) -> PromptStyle:
        """The style ready for a model's tokenizer (only the checkpoint's chat template needs it)."""
        return self

    def apply(self, instruction: str, input: str = "") -> str:
        """The prompt for `instruction` (and `input`); the response follows it directly."""
        template = self.with_input if input else self.no_input
        return template.format(instruction=instruction, input=input)

    def training_segments(self, instruction: str, input: str, output: str) -> list[Segment]:
        """The prompt (no loss) followed by the response (loss)."""
        return [(self.apply(instruction, input), False), (output, True)]


class Conversational:
    """What a multi-turn style derives from its `conversation_segments(turns, system)`: the whole conversation as
    one prompt (`apply_turns`), OpenAI-style messages (`apply_messages`, `message_segments`)."""

    multi_turn: ClassVar[bool] = True

    def apply_turns(self, turns: Sequence[Turn], system: Optional[str] = None) -> str:
        """The conversation so far, ending where the assistant answers when the last reply is missing."""
        return "".join(text for text, _ in self.conversation_segments(turns, system))

    def apply_messages(self, messages: Sequence[Message]) -> str:
        """An OpenAI-style conversation (optional system message, then user/assistant turns), to be answered."""
        turns, system = messages_to_turns(messages)
        if not turns or turns[-1][1] is not None:
            raise LitAdapterError("the last message must be the user's: it is the turn the model answers")
        return self.apply_turns(turns, system)

    def message_segments(self, messages: Sequence[Message]) -> list[Segment]:
        return self.conversation_segments(*messages_to_turns(messages))


@dataclass(frozen=True)
class ChatStyle(Conversational, PromptStyle):
    """`system###Human: message###Assistant: reply###Human: ...###Assistant:` (the official V2 chat format)."""

    system: str = CHAT_SYSTEM
    roles: tuple[str, str] = ("Human", "Assistant")
    separator: str = "###"
    # example turns written after the system line, before the conversation (never supervised)
    seed: tuple[tuple[str, str], ...] = ()

    def apply(self, instruction: str, input: str = "") -> str:
        return self.apply_turns([(_join(instruction, input), None)])

    def conversation_segments(self, turns: Sequence[Turn], system: Optional[str] = None) -> list[Segment]:
        """Segments of a conversation: every assistant reply (with the separator that ends it) is supervised."""
        human, assistant = self.roles
        prompt = (self.system if system is None else system) + self.separator
        prompt += "".join(f"{human}: {message}{self.separator}{assistant}: {reply}{self.separator}"
                          for message, reply in self.seed)
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
class TemplateStyle(PromptStyle):
    """The checkpoint's own chat template (tokenizer_config.json's `chat_template` or chat_template.jinja). A bare
    instruction becomes one user message; the rendered text carries its own BOS and end-of-turn tokens."""

    adds_special_tokens: bool = False
    template: Optional[ChatTemplate] = None
    multi_turn: ClassVar[bool] = True

    def for_tokenizer(self, tokenizer: Any) -> TemplateStyle:
        return replace(self, template=ChatTemplate.of_tokenizer(tokenizer))

    @property
    def chat_template(self) -> ChatTemplate:
        if self.template is None:
            raise LitAdapterError(
                f"prompt style {self.name!r} is the checkpoint's own chat template: bind it with the model's "
                "tokenizer (for_tokenizer) first"
            )
        return self.template

    def apply(self, instruction: str, input: str = "") -> str:
        return self.apply_messages([{"role": "user", "content": _join(instruction, input)}])

    def apply_turns(self, turns: Sequence[Turn], system: Optional[str] = None) -> str:
        return self.apply_messages(turns_to_messages(turns, system))

    def apply_messages(self, messages: Sequence[Message]) -> str:
        """The conversation followed by the assistant header (`add_generation_prompt`), to be answered."""
        return self.chat_template.render(messages, add_generation_prompt=True)

    def conversation_segments(self, turns: Sequence[Turn], system: Optional[str] = None) -> list[Segment]:
        return self.message_segments(turns_to_messages(turns, system))

    def message_segments(self, messages: Sequence[Message]) -> list[Segment]:
        """The rendered conversation cut into segments: each assistant message, with the end-of-turn text the
        template puts after it, is supervised; everything else (headers, user and system text) is not."""
        text, spans = assistant_spans(self.chat_template, messages)
        segments: list[Segment] = []
        position = 0
        for start, end in spans:
            segments += [(text[position:start], False), (text[start:end], True)]
            position = end
        segments.append((text[position:], False))
        return [segment for segment in segments if segment[0]]

    def training_segments(self, instruction: str, input: str, output: str) -> list[Segment]:
        return self.message_segments(
            [{"role": "user", "content": _join(instruction, input)}, {"role": "assistant", "content": output}]
        )


@dataclass(frozen=True)
class RawStyle(PromptStyle):
    """No template: the instruction (and input, after a blank line) as is."""

    def apply(self, instruction: str, input: str = "") -> str:
        return _join(instruction, input)


@dataclass(frozen=True)
class TurnsForm(Conversational, PromptStyle):
    """The multi-turn form of a single-turn style (alpaca, alpaca_zh; see `multi_turn_form`): the style's preamble
    once, then every turn in the style's own instruction/response format, each earlier reply right after its response
    header, as FastChat and LitGPT render Alpaca conversations. A single turn is exactly the style's own prompt."""

    preamble: str = ""
    turn: str = "{instruction}"  # one turn up to its response header, e.g. "\n\n### Instruction:\n{instruction}..."

    def conversation_segments(self, turns: Sequence[Turn], system: Optional[str] = None) -> list[Segment]:
        """The preamble and each turn's header (no loss), each reply (loss); `system` replaces the preamble."""
        prompt = self.preamble if system is None else system
        segments: list[Segment] = []
        for message, reply in turns:
            prompt += self.turn.format(instruction=message)
            if not reply:
                break
            segments += [(prompt, False), (reply, True)]
            prompt = ""
        if prompt:
            segments.append((prompt, False))
        return segments


def multi_turn_form(style: PromptStyle) -> PromptStyle:
    """`style` itself when it takes conversations, else its multi-turn form (`TurnsForm`): the no-input template cut
    at its first blank line into the preamble and the turn. A model replying past its turn writes the next
    instruction header, which ends the reply. Styles without a preamble (raw) have none."""
    if style.multi_turn:
        return style
    preamble, blank, rest = style.no_input.partition("\n\n")
    if not blank or "{instruction}" in preamble or "{instruction}" not in rest:
        raise LitAdapterError(f"prompt style {style.name!r} has no multi-turn form; use --prompt_style chat, "
                              "chat_template, alpaca or alpaca_zh")
    header = rest.split("\n", 1)[0]  # "### Instruction:": where a reply that runs on into a new turn is cut
    return TurnsForm(name=style.name, no_input=style.no_input, with_input=style.with_input,
                     stop_sequences=tuple(dict.fromkeys([*style.stop_sequences, header])),
                     adds_special_tokens=style.adds_special_tokens, preamble=preamble, turn=blank + rest)


def _join(instruction: str, input: str) -> str:
    return f"{instruction}\n\n{input}" if input else instruction


def turns_to_messages(turns: Sequence[Turn], system: Optional[str] = None) -> list[Message]:
    """(human, reply) turns as OpenAI-style messages; a missing last reply is left out (it is to be generated)."""
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    for human, reply in turns:
        messages.append({"role": "user", "content": human})
        if reply:
            messages.append({"role": "assistant", "content": reply})
    return messages


def messages_to_turns(messages: Sequence[Message]) -> tuple[list[Turn], Optional[str]]:
    """OpenAI-style messages as (human, reply) turns and the system text: an optional system message first, then
    user and assistant messages in turn (a last user message is the turn to answer)."""
    system = None
    if messages and messages[0].get("role") == "system":
        system, messages = content_text(messages[0].get("content")), messages[1:]
    turns: list[Turn] = []
    for index, message in enumerate(messages):
        expected = "user" if index % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise LitAdapterError(
                f"message {index + (system is not None)}: the chat style takes a system message first, then user and "
                f"assistant in turn, but found {message.get('role')!r} where {expected!r} belongs (roles such as tools "
                "need --prompt_style chat_template)"
            )
        if expected == "user":
            turns.append((content_text(message.get("content")), None))
        else:
            turns[-1] = (turns[-1][0], content_text(message.get("content")))
    return turns, system


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

CHAT_TEMPLATE = TemplateStyle(name="chat_template", no_input="", with_input="")

# The official 65B chat demo's conversation (`llama_adapter_v2_chat65b/conversation.py`, template `v1`): the chat
# style with one example exchange written before the user's turns.
OFFICIAL_65B_SEED = (
    (
        "Give three tips for staying healthy.",
        "Sure, here are three tips for staying healthy:\n"
        "1. Exercise regularly: Regular physical activity can help improve your overall health and wellbeing. "
        "It can also help reduce your risk of chronic conditions such as obesity, diabetes, heart disease, "
        "and certain cancers. Aim for at least 150 minutes of moderate-intensity aerobic exercise or "
        "75 minutes of vigorous-intensity aerobic exercise per week, along with muscle-strengthening "
        "activities at least two days per week.\n"
        "2. Eat a balanced diet: Eating a balanced diet that is rich in fruits, "
        "vegetables, whole grains, lean proteins, and healthy fats can help support "
        "your overall health. Try to limit your intake of processed and high-sugar foods, "
        "and aim to drink plenty of water throughout the day.\n"
        "3. Get enough sleep: Getting enough quality sleep is essential for your physical "
        "and mental health. Adults should aim for seven to nine hours of sleep per night. "
        "Establish a regular sleep schedule and try to create a relaxing bedtime routine to "
        "help improve the quality of your sleep.",
    ),
)
CHAT_OFFICIAL = ChatStyle(name="chat_official", no_input="", with_input="", stop_sequences=("###",),
                          seed=OFFICIAL_65B_SEED)

PROMPT_STYLES: dict[str, PromptStyle] = {
    style.name: style for style in (ALPACA, ALPACA_ZH, CHAT, RAW, CHAT_TEMPLATE)
}


# forms for generation and chat only (not a data set's style): the official 65B demo's seeded chat
INFERENCE_STYLES: dict[str, PromptStyle] = {CHAT_OFFICIAL.name: CHAT_OFFICIAL}


def get_prompt_style(name: str) -> PromptStyle:
    """The style called `name`; an unknown name fails with the list of known ones."""
    style = PROMPT_STYLES.get(name) or INFERENCE_STYLES.get(name)
    if style is None:
        names = [*PROMPT_STYLES, *INFERENCE_STYLES]
        raise LitAdapterError(f"unknown prompt style {name!r}; choose one of: {', '.join(names)}")
    return style
