"""Instruction data: Alpaca-style records and multi-turn conversations, tokenised once and cached.

Records are either `{"instruction", "input" (optional), "output"}` (formatted with the chosen prompt style) or
ShareGPT/LLaVA-style conversations `{"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}` (always in
the `chat` style, with the loss on every assistant turn). A JSON list or a JSON Lines file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

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
from lit_adapter.prompts import CHAT, PromptStyle, Segment, Turn
from lit_adapter.tokenizer import Tokenizer

HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "model"}


class InstructionDataModule(TokenizedDataModule):
    """Instruction-tuning data (Alpaca records, or conversations) for `lit-adapter fit`.

    Args:
        data_path: a `.json` list or `.jsonl` file of records, or "builtin:demo" (generated TinyStories-style
            instructions with a held-out validation set)
        tokenizer_path: the SentencePiece model; the trainer fills it in from the checkpoint folder when left out
        prompt_style: alpaca, alpaca_zh, chat or raw (conversations always use chat)
        max_seq_length: longer samples are cut to this many tokens (counted in a warning)
        batch_size: samples per batch, right-padded to the longest one
        val_split: validation part taken from data_path: a fraction in [0, 1) or a count (ignored for builtin:demo)
        seed: seed of the validation split and of the shuffling
        num_workers: data loader worker processes
        group_by_length: batch samples of similar length together (less padding)
        on_bad_record: "error" (stop at the first bad record) or "skip" (skip and count bad records)
        cache_dir: where tokenised data is cached (default: $LIT_ADAPTER_CACHE/tokenized or
            ~/.cache/lit-adapter/tokenized)
    """

    def __init__(
        self,
        data_path: str,
        tokenizer_path: Optional[Path] = None,
        prompt_style: str = "alpaca",
        max_seq_length: int = 512,
        batch_size: int = 4,
        val_split: Union[float, int] = 0.05,
        seed: int = 42,
        num_workers: int = 0,
        group_by_length: bool = False,
        on_bad_record: Literal["error", "skip"] = "error",
        cache_dir: Optional[Path] = None,
    ) -> None:
        super().__init__(
            data_path, tokenizer_path, prompt_style, max_seq_length, batch_size, val_split, seed, num_workers,
            group_by_length, on_bad_record, cache_dir,
        )  # fmt: skip

    def encode_source(self, role: str, tokenizer: Tokenizer, report: RecordReport) -> EncodedSamples:
        path = self.source_files(role)[0]
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
            builder.add(*encode_segments(tokenizer, segments))
        return builder.build()


def record_segments(record: dict, style: PromptStyle) -> list[Segment]:
    """The prompt/response segments of one checked record."""
    if "conversations" in record:
        turns, system = conversation_turns(record)
        return CHAT.conversation_segments(turns, system)
    instruction = string_field(record, "instruction")
    input = string_field(record, "input", required=False, allow_empty=True)
    output = string_field(record, "output")
    return style.training_segments(instruction, input, output)


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

