"""The checkpoint's Hugging Face chat template (prompt style `chat_template`) against transformers'
`apply_chat_template` on the same folder: the text and the tokens of conversations (system + several turns) under
real templates (Llama 3, Llama 3.2 with tools, Mistral v0.3, Qwen2.5, Falcon, Gemma 2/3, Phi-3, ChatML with
generation blocks), through `lit-adapter generate --messages`, the chat session and the training data (loss on
assistant turns only)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from lit_adapter.checkpoint import save_checkpoint
from lit_adapter.cli import main
from lit_adapter.config import ModelConfig
from lit_adapter.data.instruction import InstructionDataModule
from lit_adapter.errors import LitAdapterError
from lit_adapter.inference.chat import ChatSession, conversation_ids, conversation_style, read_messages
from lit_adapter.inference.engine import Decoding, Engine
from lit_adapter.prompts import CHAT_TEMPLATE, TemplateStyle
from lit_adapter.tokenizer import Tokenizer
from tests.chat_templates import TEMPLATES, Template
from tests.helpers import random_state_dict
from tests.hf_tokenizer import CORPUS, save_tokenizer_folder, train_byte_level_bpe, transformers_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant. 请用中文或英文回答。"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "中国的首都是哪里？"},
    {"role": "assistant", "content": " 中国的首都是北京。🙂 "},
    {"role": "user", "content": "Write a short poem about the sea and the moon."},
]
ANSWERED = [*CONVERSATION, {"role": "assistant", "content": "The moon hangs low,\n大海轻轻唱。"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市"}},
                       "required": ["city"]},
    },
}  # fmt: skip


def conversation(template: Template, messages: list[dict] = CONVERSATION) -> list[dict]:
    return messages if template.system else messages[1:]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One byte-level BPE (all the templates' special tokens) and, per template, a folder with its
    tokenizer_config.json (bos/eos tokens, chat_template)."""
    specials = list(dict.fromkeys(s for t in TEMPLATES.values() for s in t.specials))
    texts = CORPUS + [m["content"] for m in ANSWERED] + [t.source for t in TEMPLATES.values()]
    hf = train_byte_level_bpe(texts, specials, vocab_size=900)
    root = tmp_path_factory.mktemp("templates")
    out = {}
    for name, template in TEMPLATES.items():
        stops = [hf.token_to_id(template.eos)]
        save_tokenizer_folder(root / name, hf, bos=template.bos or None, eos=template.eos,
                              chat_template=template.source, eos_token_ids=stops)
        out[name] = root / name
    return out


def style_for(folder: Path) -> tuple[Tokenizer, TemplateStyle]:
    tokenizer = Tokenizer(folder / "tokenizer.json")
    return tokenizer, CHAT_TEMPLATE.for_tokenizer(tokenizer)


def reference_ids(folder: Path, messages: list[dict], **kwargs) -> list[int]:
    return transformers_tokenizer(folder).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_conversation_text_and_tokens_equal_transformers(name: str, folders: dict[str, Path]) -> None:
    template, folder = TEMPLATES[name], folders[name]
    messages = conversation(template)
    tokenizer, style = style_for(folder)
    text = style.apply_messages(messages)
    reference = transformers_tokenizer(folder)
    assert text == reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "北京" in text and "Paris" in text and (not template.system or "请用中文" in text)
    ids = tokenizer.encode(text, bos=style.adds_special_tokens)
    assert ids == reference_ids(folder, messages)


@pytest.mark.parametrize("name", ["llama3.2", "qwen2.5", "mistral"])
def test_tools_and_tool_calls_render_as_transformers_renders_them(name: str, folders: dict[str, Path]) -> None:
    _, style = style_for(folders[name])
    reference = transformers_tokenizer(folders[name])
    messages = [CONVERSATION[0], {"role": "user", "content": "北京天气怎么样？"}]
    kwargs = dict(tools=[WEATHER_TOOL], add_generation_prompt=True)
    text = style.chat_template.render(messages, **kwargs)
    assert text == reference.apply_chat_template(messages, tokenize=False, **kwargs)
    assert '"城市"' in text or "城市" in text  # tojson keeps non-ASCII text
    if name == "qwen2.5":
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]}
        result = {"role": "tool", "content": '{"temperature": 21}'}
        messages = [*messages, call, result]
        assert style.chat_template.render(messages, **kwargs) == reference.apply_chat_template(
            messages, tokenize=False, **kwargs)


def test_a_template_refusal_is_one_line_naming_the_file(folders: dict[str, Path], tmp_path: Path) -> None:
    from jinja2 import TemplateError

    _, style = style_for(folders["gemma2"])
    with pytest.raises(TemplateError, match="System role not supported"):
        transformers_tokenizer(folders["gemma2"]).apply_chat_template(CONVERSATION, tokenize=False)
    with pytest.raises(LitAdapterError, match=r"gemma2/tokenizer_config.json: chat template: System role not "):
        style.apply_messages(CONVERSATION)
    (tmp_path / "tokenizer.json").write_bytes((folders["llama3"] / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}"}))
    with pytest.raises(LitAdapterError, match=r"tokenizer_config.json: chat template: Unexpected end of template"):
        CHAT_TEMPLATE.for_tokenizer(Tokenizer(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(LitAdapterError, match="the tokenizer has no chat template"):
        CHAT_TEMPLATE.for_tokenizer(Tokenizer(tmp_path))


def test_chat_template_jinja_file_wins_over_tokenizer_config(folders: dict[str, Path], tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folders["qwen2.5"] / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text(TEMPLATES["llama3"].source.replace("bos_token + ", ""))
    _, style = style_for(tmp_path)
    text = style.apply_messages(CONVERSATION)
    assert text == transformers_tokenizer(tmp_path).apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                                                         tokenize=False)
    assert text.startswith("<|start_header_id|>system")


@pytest.fixture(scope="module")
def checkpoints(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random LLaMA per template, its checkpoint folder holding that template's tokenizer files."""
    vocab = Tokenizer(folders["llama3"] / "tokenizer.json").vocab_size
    config = ModelConfig(name="tiny-chat", vocab_size=vocab, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                         max_seq_len=512)
    state = random_state_dict(config)
    root = tmp_path_factory.mktemp("chat-checkpoints")
    return {name: save_checkpoint(root / name, state, config, folder / "tokenizer.json")
            for name, folder in folders.items()}


@pytest.mark.parametrize("name", ["llama3", "llama3.2", "mistral", "qwen2.5", "falcon", "gemma3", "phi3"])
def test_generate_messages_answers_with_the_checkpoints_template(
    name: str, folders: dict[str, Path], checkpoints: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture, one_torch_thread: None,
) -> None:
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(CONVERSATION, ensure_ascii=False))
    assert sorted(p.name for p in checkpoints[name].iterdir()) == [
        "generation_config.json", "model.safetensors", "model_config.yaml", "tokenizer.json", "tokenizer_config.json"]
    engine = Engine.load(checkpoints[name], device="cpu", precision="32-true")
    engine.style = conversation_style(engine)  # no adapter, no --prompt_style: the checkpoint's template
    assert engine.style.name == "chat_template"
    ids = conversation_ids(engine, read_messages(path))
    assert ids.tolist() == reference_ids(folders[name], CONVERSATION)
    expected = engine.complete(ids, Decoding(max_new_tokens=6)).text

    capsys.readouterr()
    main(["generate", "--checkpoint_dir", str(checkpoints[name]), "--messages", str(path), "--max_new_tokens", "6",
          "--json", "--temperature", "0", "--device", "cpu", "--precision", "32-true"])  # fmt: skip
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["prompt_tokens"] == ids.numel() and record["text"] == expected


def test_generate_messages_errors(checkpoints: dict[str, Path], tmp_path: Path, capsys) -> None:
    path = tmp_path / "messages.json"
    for content, fragment in [
        ('{"role": "user"}', "message 0.content must be a string or a list of text parts"),
        ("[]", "expected a non-empty JSON list of messages"),
        ('[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]', "only text is supported"),
    ]:
        path.write_text(content if content.startswith("[") else f"[{content}]")
        with pytest.raises(SystemExit) as done:
            main(["generate", "--checkpoint_dir", str(checkpoints["llama3"]), "--messages", str(path),
                  "--device", "cpu"])  # fmt: skip
        assert done.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and str(path) in error[0] and fragment in error[0], error


def test_chat_session_prompts_are_the_templates(folders, checkpoints, one_torch_thread) -> None:
    engine = Engine.load(checkpoints["qwen2.5"], device="cpu", precision="32-true")
    engine.style = conversation_style(engine)
    prompts: list[list[int]] = []
    stream = engine.stream

    def recording(ids, *args, **kw):
        prompts.append(ids.tolist())
        return stream(ids, *args, **kw)

    engine.stream = recording
    session = ChatSession(engine, Decoding(max_new_tokens=4), system=CONVERSATION[0]["content"],
                          out=io.StringIO(), err=io.StringIO())
    session.handle(CONVERSATION[1]["content"])
    session.handle(CONVERSATION[3]["content"])
    (_, reply), _ = session.turns
    answered = [{"role": "assistant", "content": reply}] if reply else []
    history = [CONVERSATION[0], CONVERSATION[1], *answered, CONVERSATION[3]]
    assert prompts[0] == reference_ids(folders["qwen2.5"], CONVERSATION[:2])
    assert prompts[1] == reference_ids(folders["qwen2.5"], history)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_training_segments_supervise_the_assistant_turns_only(name: str, folders: dict[str, Path]) -> None:
    template = TEMPLATES[name]
    messages = conversation(template, ANSWERED)
    _, style = style_for(folders[name])
    segments = style.message_segments(messages)
    whole = transformers_tokenizer(folders[name]).apply_chat_template(messages, tokenize=False)
    assert "".join(text for text, _ in segments) == whole
    supervised = [text for text, loss in segments if loss]
    replies = [m["content"].strip() for m in messages if m["role"] == "assistant"]
    assert len(supervised) == len(replies)
    for text, reply in zip(supervised, replies, strict=True):
        assert text.lstrip().startswith(reply), (text, reply)  # no header or user text before the reply
        # the reply ends with the template's end-of-turn text (Phi-3's last one with EOS after it)
        end = text.rstrip()
        assert end.endswith(template.end_of_turn) or end.endswith(f"{template.end_of_turn}\n{template.eos}"), text
    others = [m["content"].strip() for m in messages if m["role"] != "assistant"]
    assert not any(other in text for other in others for text in supervised)


def test_generation_blocks_give_the_same_mask_as_transformers(folders: dict[str, Path]) -> None:
    folder = folders["chatml-generation"]
    tokenizer, style = style_for(folder)
    reference = transformers_tokenizer(folder).apply_chat_template(
        ANSWERED, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    from lit_adapter.data.encoding import encode_segments

    ids, supervised = encode_segments(tokenizer, style.message_segments(ANSWERED), special=False)
    assert ids == reference["input_ids"] and [int(s) for s in supervised] == reference["assistant_masks"]


@pytest.mark.parametrize("name", ["llama3", "mistral", "phi3"])
def test_messages_records_train_on_the_assistant_tokens(name: str, folders: dict[str, Path], tmp_path: Path) -> None:
    """Training data in messages form: the tokens are apply_chat_template's (no BOS/EOS added), the loss falls on
    the replies and their end-of-turn tokens; an Alpaca record in the same file becomes one user turn."""
    data = tmp_path / "chats.jsonl"
    alpaca = {"instruction": "Say hello in Chinese.", "output": "你好！"}
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ({"messages": ANSWERED}, alpaca)))
    module = InstructionDataModule(str(data), tokenizer_path=folders[name] / "tokenizer.json",
                                   prompt_style="chat_template", val_split=0, max_seq_length=2048,
                                   cache_dir=tmp_path / "cache")
    module.setup()
    tokenizer, reference = Tokenizer(folders[name]), transformers_tokenizer(folders[name])
    rows = [module.train_dataset[i] for i in range(2)]
    pairs = [ANSWERED, [{"role": "user", "content": alpaca["instruction"]},
                        {"role": "assistant", "content": alpaca["output"]}]]
    for row, messages in zip(rows, pairs, strict=True):
        assert row["input_ids"].tolist() == reference.apply_chat_template(messages, tokenize=True, return_dict=False)
        labels = row["labels"][row["labels"] != -100].tolist()
        replies = [m["content"].strip() for m in messages if m["role"] == "assistant"]
        assert "".join(tokenizer.decode(labels).split()) == "".join("".join(replies).split())  # nothing else
        end = tokenizer.token_id(TEMPLATES[name].end_of_turn)
        assert labels.count(end) == len(replies)
