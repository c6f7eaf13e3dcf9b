"""Instruction data: Alpaca-style records and multi-turn conversations, tokenised once and cached.

Records are either `{"instruction", "input" (optional), "output"}` (formatted with the chosen prompt style) or
ShareGPT/LLaVA-style conversations `{"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}` (in the `chat`
style, with the loss on every assistant turn; another prompt style is refused, since the adapter would then be saved
with a template it was not trained in). A JSON list or a JSON Lines file.
"""

from __future__ import annotations

from typing import Optional

from tqdm import tqdm

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
from lit_adapter.prompts import ALPACA, CHAT, ChatStyle, PromptStyle, Segment, Turn
from lit_adapter.tokenizer import Tokenizer

HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "model"}


class InstructionDataModule(TokenizedDataModule):
    """Instruction-tuning data (Alpaca records, or conversations) for `lit-adapter fit`.

    `data_path`: a `.json` list or `.jsonl` file of records, or "builtin:demo" (generated TinyStories-style
    instructions with a held-out validation set). The other arguments are those of every data module (see
    `TokenizedDataModule`); conversations need the chat style (prompt_style None: Alpaca records in alpaca,
    conversations in chat).
    """

    def encode_split(self, split: str, tokenizer: Tokenizer, report: RecordReport) -> EncodedSamples:
        path = self.split_files(split)[0]
        records = list(read_records(path))
        gate = RecordGate(path, report, self.on_bad_record)
        builder = SampleBuilder(report, self.max_seq_length)
        progress = tqdm(records, desc=f"tokenising {path.name}", disable=len(records) < PROGRESS_MIN_RECORDS)
        for record in progress:
            try:
                if record.error is not None:
                    raise record.error
                segments = record_segments(record_object(record.value), self.prompt_style)
            except BadRecord as bad:
                gate.reject(record, bad)
                continue
            except LitAdapterError as err:
                raise LitAdapterError(f"{path}: {record.where()}: {err}") from None
            builder.add(*encode_segments(tokenizer, segments))
        return builder.build()


def record_segments(record: dict, style: Optional[PromptStyle]) -> list[Segment]:
    """The prompt/response segments of one checked record (style None: alpaca, conversations in chat)."""
    if "conversations" in record:
        if style is not None and not isinstance(style, ChatStyle):
            raise LitAdapterError(
                f"a conversation takes the chat style, but the prompt style is {style.name!r}: set prompt_style "
                "chat (lit-adapter fit: model.adapter.prompt_style: chat)"
            )
        turns, system = conversation_turns(record)
        return (style or CHAT).conversation_segments(turns, system)
    instruction = string_field(record, "instruction")
    input = string_field(record, "input", required=False, allow_empty=True)
    output = string_field(record, "output")
    return (style or ALPACA).training_segments(instruction, input, output)


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

