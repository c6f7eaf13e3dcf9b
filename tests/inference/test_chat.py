"""`lit-adapter chat`: the chat template over turns, history within the context window, /image, /reset, /exit."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

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
