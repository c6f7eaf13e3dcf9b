"""`lit-adapter chat`: the chat template over turns, history within the context window, /image, /reset, /exit."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_adapter.checkpoint import load_model
from lit_adapter.inference.chat import ChatSession, run_chat
from lit_adapter.inference.engine import Decoding
from lit_adapter.inference.experts import CaptionFileExpert
from lit_adapter.prompts import get_prompt_style
from tests.helpers import write_image
from tests.inference.conftest import engine_for

ROOT = Path(__file__).resolve().parents[2]
CHAT = get_prompt_style("chat")


def session_for(checkpoint_dir: Path, context: int = 512, **kwargs) -> tuple[ChatSession, list[str], io.StringIO]:
    """A greedy chat session on stories260K whose prompts (as text) are recorded."""
    model = load_model(checkpoint_dir)
    model.config.max_seq_len = context
    engine = engine_for(checkpoint_dir, model, style="chat")
    prompts: list[str] = []
    stream = engine.stream

    def recording(ids, *args, **kw):
        prompts.append(engine.tokenizer.decode(ids.tolist()))
        return stream(ids, *args, **kw)

    engine.stream = recording
    out = io.StringIO()
    session = ChatSession(engine, Decoding(max_new_tokens=12, stop=("###",)), out=out, err=io.StringIO(), **kwargs)
    return session, prompts, out


def test_turns_follow_the_chat_template_and_old_turns_are_dropped(stories260k_dir):
    session, prompts, out = session_for(stories260k_dir)
    session.handle("Hello there")
    session.handle("Tell me about Lily")
    first, second = session.turns
    assert prompts[1] == CHAT.apply_turns([first, ("Tell me about Lily", None)])
    assert out.getvalue().splitlines()[:1] == [first[1]] and "###" not in out.getvalue()

    third = "What did the dog do"
    need = len(session.engine.encode(CHAT.apply_turns([first, second, (third, None)])))
    session.engine.llama.config.max_seq_len = need + 12 - 1  # one token short of room for the whole history
    session.handle(third)
    assert prompts[2] == CHAT.apply_turns([second, (third, None)])
    assert [t[0] for t in session.turns] == ["Tell me about Lily", third]
    assert "dropped the 1 oldest turn" in session.err.getvalue()


def test_reset_and_exit(stories260k_dir):
    session, prompts, _ = session_for(stories260k_dir)
    run_chat(session, ["Hello there\n", "/reset\n", "Hi\n", "\n", "/exit\n", "Never answered\n"])
    assert prompts == [CHAT.apply_turns([("Hello there", None)]), CHAT.apply_turns([("Hi", None)])]
    assert [t[0] for t in session.turns] == ["Hi"]
    assert "conversation reset" in session.err.getvalue()


def test_a_message_too_long_for_the_context_is_refused_and_the_chat_goes_on(stories260k_dir):
    session, prompts, _ = session_for(stories260k_dir, context=160)
    session.handle("story " * 100)
    assert prompts == [] and "send a shorter one" in session.err.getvalue()
    session.handle("Hi")
    assert len(prompts) == 1 and len(session.turns) == 1


def test_image_expert_text_goes_into_the_next_message_only(stories260k_dir, tmp_path):
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"cat.png": "A cat on a mat."}))
    session, prompts, _ = session_for(stories260k_dir, expert=CaptionFileExpert(captions))
    session.handle(f"/image {write_image(tmp_path / 'cat.png', (120, 60, 0))}")
    session.handle("What is this?")
    session.handle("And then?")
    assert session.turns[0][0] == "What is this?\n\nA cat on a mat."
    assert prompts[1].endswith("Human: And then?###Assistant:") and prompts[1].count("A cat on a mat.") == 1
    session.handle(f"/image {tmp_path / 'missing.png'}")
    assert "missing.png: image not found" in session.err.getvalue()


def test_chat_through_a_pipe_with_a_small_context(stories260k_dir, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for name in ("model.safetensors", "tokenizer.model"):
        (small / name).symlink_to(stories260k_dir / name)
    config = yaml.safe_load((stories260k_dir / "model_config.yaml").read_text())
    (small / "model_config.yaml").write_text(yaml.safe_dump({**config, "max_seq_len": 180}))
    lines = ["Hello there, how are you", "Tell me about the big dog", "What did Lily find in the park", "/reset",
             "Hi again", "/exit", "Never answered"]
    result = subprocess.run(
        [sys.executable, "-m", "lit_adapter.cli", "chat", "--checkpoint_dir", str(small), "--max_new_tokens", "16",
         "--stop", "\n", "--temperature", "0"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 4  # three turns, one after /reset, none after /exit
    assert "oldest turn(s)" in result.stderr and "conversation reset" in result.stderr


# ---- the adapter's own template: single-turn styles in their multi-turn form, the official 65B form ----

def test_single_turn_styles_take_conversations_in_their_own_format():
    from lit_adapter.errors import LitAdapterError
    from lit_adapter.prompts import ALPACA, ALPACA_ZH, RAW, multi_turn_form

    alpaca = multi_turn_form(ALPACA)
    assert alpaca.multi_turn and multi_turn_form(CHAT) is CHAT
    assert alpaca.apply_turns([("Hi", None)]) == ALPACA.apply("Hi")  # one turn: the template itself
    assert alpaca.apply_turns([("Hi", "Hello!"), ("Who are you?", None)]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nHi\n\n### Response:Hello!"
        "\n\n### Instruction:\nWho are you?\n\n### Response:")
    briefly = alpaca.apply_turns([("Hi", None)], system="Be brief.")
    assert briefly == "Be brief.\n\n### Instruction:\nHi\n\n### Response:"
    assert alpaca.stop_sequences == ("### Instruction:",)
    assert alpaca.apply_messages([{"role": "user", "content": "Hi"}]) == ALPACA.apply("Hi")
    chinese = multi_turn_form(ALPACA_ZH)
    assert chinese.apply_turns([("你好", "你好！"), ("再见", None)]) == (
        "下面是一条描述任务的指令。请写出恰当完成该请求的回答。"
        "\n\n### 指令:\n你好\n\n### 回答:你好！\n\n### 指令:\n再见\n\n### 回答:")
    assert chinese.stop_sequences == ("### 指令:",)
    with pytest.raises(LitAdapterError, match="'raw' has no multi-turn form"):
        multi_turn_form(RAW)


def test_the_official_65b_form_starts_with_its_seeded_exchange():
    from lit_adapter.prompts import CHAT_OFFICIAL, CHAT_SYSTEM, OFFICIAL_65B_SEED

    (question, answer), = OFFICIAL_65B_SEED
    assert question == "Give three tips for staying healthy."
    assert answer.startswith("Sure, here are three tips for staying healthy:\n1. Exercise regularly:")
    assert answer.endswith("help improve the quality of your sleep.") and answer.count("\n") == 3
    # the official conversation.py (sep_style SINGLE): system + sep, then "role: message" + sep per message, and
    # the open turn "Assistant:"
    expected = f"{CHAT_SYSTEM}###Human: {question}###Assistant: {answer}###Human: Hi###Assistant:"
    assert CHAT_OFFICIAL.apply("Hi") == expected == CHAT_OFFICIAL.apply_turns([("Hi", None)])
    assert get_prompt_style("chat_official") is CHAT_OFFICIAL
    assert CHAT.apply("Hi") == f"{CHAT_SYSTEM}###Human: Hi###Assistant:"  # the plain form is unchanged


@pytest.fixture(scope="module")
def demo(assets, tmp_path_factory):
    from tests.readme_runs import demo_adapter

    return demo_adapter(tmp_path_factory)


def test_chat_with_the_demo_adapter_answers_in_its_template(demo, capsys, monkeypatch):
    from tests.helpers import run_main

    checkpoint, adapter = demo
    prompt = "Write a story about a girl named Mia who likes kites."
    common = ["--checkpoint_dir", str(checkpoint), "--adapter", str(adapter), "--temperature", "0",
              "--max_new_tokens", "48"]
    code, generated, err = run_main(["generate", *common, "--prompt", prompt], capsys, monkeypatch)
    assert code == 0, err
    code, chatted, err = run_main(["chat", *common], capsys, monkeypatch, stdin=f"{prompt}\nAnd then?\n")
    assert code == 0, err
    first, second = chatted.splitlines()
    assert first == generated.strip() and first.startswith("Once upon a time")  # the alpaca template, greedy
    code, explicit, err = run_main(["chat", *common, "--prompt_style", "alpaca"], capsys, monkeypatch,
                                   stdin=f"{prompt}\n")
    assert code == 0 and explicit.splitlines() == [first], err


def test_chat_takes_every_imagebind_input_and_a_bad_file_is_one_notice(stories260k_dir, tmp_path, capsys, monkeypatch):
    import torch

    from tests.adapters.test_imagebind_llm import official_imagebind_llm
    from tests.encoders.helpers import save_tiny_imagebind
    from tests.encoders.test_media import write_sine
    from tests.helpers import run_main

    torch.save(official_imagebind_llm(), tmp_path / "7B.pth")
    encoder = save_tiny_imagebind(tmp_path / "imagebind_w3D.pth")
    image, audio = write_image(tmp_path / "a.png"), tmp_path / "b.wav"
    write_sine(audio, 2.0)
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    common = ["--checkpoint_dir", str(stories260k_dir), "--adapter", str(tmp_path / "7B.pth"), "--encoder_weights",
              str(encoder), "--temperature", "0", "--max_new_tokens", "8"]
    code, out, err = run_main(["generate", *common, "--prompt", "Describe it.", "--image", f"{image}:0.5",
                               "--audio", f"{audio}:0.5", "--json"], capsys, monkeypatch)
    assert code == 0, err
    expected = json.loads(out)["text"].strip()
    lines = [f"/image {image}:0.5", f"/audio {tmp_path / 'bad.wav'}", f"/audio {audio}:0.5", "Describe it.",
             "/point", "/exit"]
    code, out, err = run_main(["chat", *common], capsys, monkeypatch, stdin="\n".join(lines) + "\n")
    assert code == 0, err
    assert out.splitlines() == [expected]  # the same mix as generate's, the bad file changed nothing
    notices = err.strip().splitlines()
    assert len([n for n in notices if "bad.wav" in n]) == 1 and "bad.wav: cannot read audio" in err
    assert "usage: /point PATH[:WEIGHT]" in err
