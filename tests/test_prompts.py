from __future__ import annotations

import pytest

from lit_adapter.errors import LitAdapterError
from lit_adapter.prompts import CHAT_SYSTEM, PROMPT_STYLES, get_prompt_style

# The two Stanford Alpaca templates as the LLaMA-Adapter recipe uses them (reference.md section 2), written out whole.
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nName three colors.\n\n### Response:"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n### Input:\nBonjour"
    "\n\n### Response:"
)


def test_alpaca_templates_are_verbatim():
    style = get_prompt_style("alpaca")
    assert style.apply("Name three colors.") == ALPACA_NO_INPUT
    assert style.apply("Translate.", "Bonjour") == ALPACA_WITH_INPUT
    # the response follows "### Response:" directly, with nothing in between
    assert style.training_segments("Name three colors.", "", "Red.") == [(ALPACA_NO_INPUT, False), ("Red.", True)]


def test_alpaca_zh_has_the_same_structure():
    style = get_prompt_style("alpaca_zh")
    no_input, with_input = style.apply("说三种颜色。"), style.apply("翻译。", "Bonjour")
    assert no_input.endswith("\n\n### 指令:\n说三种颜色。\n\n### 回答:")
    assert with_input.endswith("\n\n### 指令:\n翻译。\n\n### 输入:\nBonjour\n\n### 回答:")
    assert no_input.count("\n\n") == 2 and with_input.count("\n\n") == 3


def official_get_prompt(system: str, turns) -> str:
    """The official V2 chat `Conversation.get_prompt` (SeparatorStyle.SINGLE, sep "###"), restated."""
    messages = [m for human, reply in turns for m in (("Human", human), ("Assistant", reply))]
    text = system + "###"
    for role, message in messages:
        text += f"{role}: {message}###" if message else f"{role}:"
    return text


def test_chat_single_and_multi_turn():
    style = get_prompt_style("chat")
    assert CHAT_SYSTEM == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions."
    )
    assert style.apply("Hi") == CHAT_SYSTEM + "###Human: Hi###Assistant:"
    history = [("Hi", "Hello!"), ("How are you?", None)]
    assert style.apply_turns(history) == official_get_prompt(CHAT_SYSTEM, history)
    assert style.apply_turns([("Q", None)], system="Be brief.") == "Be brief.###Human: Q###Assistant:"
    assert style.stop_sequences == ("###",)
    segments = style.conversation_segments([("Q1", "A1"), ("Q2", "A2")])
    assert segments == [
        (CHAT_SYSTEM + "###Human: Q1###Assistant:", False),
        (" A1###", True),
        ("Human: Q2###Assistant:", False),
        (" A2###", True),
    ]


def test_raw_is_the_text_as_is():
    style = get_prompt_style("raw")
    assert style.apply("Once upon a time") == "Once upon a time"
    assert style.apply("Story:", "a cat") == "Story:\n\na cat"
    assert not hasattr(style, "apply_turns")


def test_unknown_style_lists_the_known_ones():
    with pytest.raises(LitAdapterError, match="unknown prompt style .vicuna.*alpaca, alpaca_zh, chat, raw, chat_temp"):
        get_prompt_style("vicuna")
    assert set(PROMPT_STYLES) == {"alpaca", "alpaca_zh", "chat", "raw", "chat_template"}
