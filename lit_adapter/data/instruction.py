"""Instruction data: Alpaca-style records and multi-turn conversations, tokenised once and cached.

Records are one of:
- `{"instruction", "input" (optional), "output"}`, formatted with the chosen prompt style;
- ShareGPT/LLaVA-style conversations `{"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}`;
- OpenAI-style conversations `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`.
Conversations take a multi-turn style (`chat`, or `chat_template`: the checkpoint's own Hugging Face template),
with the loss on every assistant turn only; another prompt style is refused, since the adapter would then be saved
with a template it was not trained in. Any record may name its own template with `"prompt_style"` (e.g.
`"alpaca_zh"` for the Chinese records of a mixed English + Chinese file), else the data set's style applies.
A JSON list or a JSON Lines file.
"""

from __future__ import annotations

from typing import Any, Optional

from tqdm import tqdm

from lit_adapter.chat_template import Message, check_messages
from lit_adapter.data.base import PROGRESS_MIN_RECORDS, TokenizedDataModule
from lit_adapter.data.encoding import EncodedSamples, SampleBuilder, encode_segments
from lit_adapter.data.records import (
    BadRecord,
    RecordGate,
    RecordReport,
    read_records,
    record_object,
    string_field,
)
from lit_adapter.errors import LitAdapterError
from lit_adapter.prompts import ALPACA, CHAT, PROMPT_STYLES, PromptStyle, Segment, Turn, get_prompt_style
from lit_adapter.tokenizer import Tokenizer

HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "model"}


class InstructionDataModule(TokenizedDataModule):
    """Instruction-tuning data (Alpaca records, or conversations) for `lit-adapter fit`.

    `data_path`: a `.json` list or `.jsonl` file of records, or "builtin:demo" (generated TinyStories-style
    instructions with a held-out validation set). The other arguments are those of every data module (see
    `TokenizedDataModule`); conversations need a multi-turn style (prompt_style None: Alpaca records in alpaca,
    conversations in chat). A record's own "prompt_style" field overrides the data set's style for that record.
    """

    def encode_split(self, split: str, tokenizer: Tokenizer, report: RecordReport) -> EncodedSamples:
        path = self.split_files(split)[0]
        records = list(read_records(path))
        gate = RecordGate(path, report, self.on_bad_record)
        builder = SampleBuilder(report, self.max_seq_length)
        styles = StyleChooser(self.prompt_style, tokenizer)
        progress = tqdm(records, desc=f"tokenising {path.name}", disable=len(records) < PROGRESS_MIN_RECORDS)
        for record in progress:
            try:
                if record.error is not None:
                    raise record.error
                value = record_object(record.value)
                style = styles.for_record(value)
                segments = record_segments(value, style)
            except BadRecord as bad:
                gate.reject(record, bad)
                continue
            except LitAdapterError as err:
                raise LitAdapterError(f"{path}: {record.where()}: {err}") from None
            builder.add(*encode_segments(tokenizer, segments, special=(style or ALPACA).adds_special_tokens))
        return builder.build()


class StyleChooser:
    """The prompt style of each record: its own "prompt_style" field, else the data set's (None: by record kind).
    Styles are bound to the tokenizer once (the checkpoint's chat template is compiled once)."""

    def __init__(self, default: Optional[PromptStyle], tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.default = default.for_tokenizer(tokenizer) if default is not None else None
        self.bound: dict[str, PromptStyle] = {}

    def for_record(self, record: dict) -> Optional[PromptStyle]:
        if record.get("prompt_style") is None:
            return self.default
        name = string_field(record, "prompt_style")
        if name not in PROMPT_STYLES:
            raise BadRecord(
                "unknown prompt_style", f"field 'prompt_style' is {name!r}; choose one of: {', '.join(PROMPT_STYLES)}"
            )
        if name not in self.bound:
            self.bound[name] = get_prompt_style(name).for_tokenizer(self.tokenizer)
        return self.bound[name]


def record_segments(record: dict, style: Optional[PromptStyle]) -> list[Segment]:
    """The prompt/response segments of one checked record (style None: alpaca, conversations in chat)."""
    if "conversations" in record or "messages" in record:
        style = style or CHAT
        if not style.multi_turn:
            raise LitAdapterError(
                f"a conversation takes the chat style, but the prompt style is {style.name!r}: set prompt_style chat "
                "or chat_template (lit-adapter fit: model.adapter.prompt_style: chat)"
            )
        messages = record_messages(record) if "messages" in record else turns_as_messages(*conversation_turns(record))
        try:
            return style.message_segments(messages)
        except LitAdapterError as err:  # roles the style has no place for, or the chat template refused it
            raise BadRecord(f"conversation the {style.name} style cannot render", str(err)) from None
    instruction = string_field(record, "instruction")
    input = string_field(record, "input", required=False, allow_empty=True)
    output = string_field(record, "output")
    return (style or ALPACA).training_segments(instruction, input, output)


def record_messages(record: dict) -> list[Message]:
    """The checked OpenAI-style messages of a record; at least one assistant message carries the loss."""
    try:
        messages = check_messages(record["messages"])
    except LitAdapterError as err:
        raise BadRecord("bad messages", f"field 'messages': {err}") from None
    if not any(m["role"] == "assistant" and m.get("content") for m in messages):
        raise BadRecord("no assistant message", "field 'messages' has no assistant message to learn from")
    return messages


def turns_as_messages(turns: list[Turn], system: Optional[str]) -> list[Message]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for human, reply in turns:
        messages += [{"role": "user", "content": human}, {"role": "assistant", "content": reply}]
    return messages


def conversation_turns(record: dict) -> tuple[list[Turn], Optional[str]]:
    """(human, assistant) pairs of a ShareGPT/LLaVA conversation, and its system line if it has one."""
    messages = record["conversations"]
    if not isinstance(messages, list) or not messages:
        raise BadRecord(
            "wrong type for field 'conversations'", "field 'conversations' must be a non-empty list of turns"
        )
    system = string_field(record, "system", required=False) or None
    turns: list[Turn] = []
    human: Optional[str] = None
    for index, message in enumerate(messages):
        label = f"conversations[{index}]"
        if not isinstance(message, dict):
            raise BadRecord(
                "wrong type for field 'conversations'", f"field {label!r} must be an object with 'from' and 'value'"
            )
        role = string_field(message, "from", label=f"{label}.from").strip().lower()
        if role == "system" and index == 0:
            system = string_field(message, "value", label=f"{label}.value")
        elif role in HUMAN_ROLES and human is None:
            human = string_field(message, "value", label=f"{label}.value")
        elif role in ASSISTANT_ROLES and human is not None:
            turns.append((human, _assistant_value(message, label)))
            human = None
        else:
            expected = "a human turn" if human is None else "an assistant turn"
            raise BadRecord("turns out of order", f"field '{label}.from' is {role!r} where {expected} belongs")
    if human is not None:
        raise BadRecord("turns out of order", "the conversation ends with a human turn that has no reply")
    return turns, system


def _assistant_value(message: dict, label: str) -> str:
    try:
        return string_field(message, "value", label=f"{label}.value")
    except BadRecord as bad:
        if bad.reason.startswith("empty"):
            raise BadRecord("empty output", f"field '{label}.value' (an assistant turn) is empty") from None
        raise
