"""ImageBind-LLM inputs over the OpenAI API: an image_url part and an input_audio part (a real WAV) give, token for
token, what `lit-adapter generate --image F --audio G --encoder_weights W` gives for the same files, whole and
streamed; refused inputs are one-line OpenAI-shaped 400s and the server goes on; a single-turn style (alpaca) takes
a conversation as `lit-adapter chat` renders it."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from lit_adapter.errors import LitAdapterError
from tests.adapters.test_imagebind_llm import official_imagebind_llm
from tests.encoders.helpers import save_tiny_imagebind, write_pcm16
from tests.helpers import run_main, write_image
from tests.serving.conftest import MODEL, data_url, health, running_server

CHAT = "/v1/chat/completions"
QUESTION = "Describe it."


def write_wav(path: Path, seconds: float = 2.5, rate: int = 22050) -> Path:
    """A 16-bit mono sine (resampled to 16 kHz on reading: the whole audio path runs)."""
    t = np.arange(int(seconds * rate)) / rate
    samples = np.round(9000 * np.sin(2 * np.pi * 330 * t) + 3000 * np.sin(2 * np.pi * 1200 * t)).astype(np.int16)
    return write_pcm16(path, samples, rate)


@pytest.fixture(scope="module")
def bind_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bind")
    torch.save(official_imagebind_llm(), folder / "7B.pth")
    return {"adapter": folder / "7B.pth", "encoder": save_tiny_imagebind(folder / "imagebind_w3D.pth"),
            "image": write_image(folder / "a.png", (30, 160, 60)), "audio": write_wav(folder / "b.wav")}


@pytest.fixture(scope="module")
def bind_server(stories260k_dir: Path, bind_files):
    with running_server(stories260k_dir, bind_files["adapter"], encoder_weights=bind_files["encoder"]) as running:
        yield running


def audio_part(data: bytes, format: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": format}}


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": QUESTION}, *parts]}]


def post(server, messages, **settings) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 24, **settings}
    return httpx.post(f"{server.url}{CHAT}", json=body, timeout=60)


def refused(response: httpx.Response, *fragments: str) -> str:
    """A 400 with an OpenAI-shaped error whose one-line message names every fragment."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert "\n" not in error["message"]
    for fragment in fragments:
        assert fragment in error["message"], (fragment, error["message"])
    return error["message"]


def test_image_and_audio_equal_generate(bind_server, bind_files, stories260k_dir, tmp_path, capsys,
                                        monkeypatch) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    (tmp_path / "messages.json").write_text(json.dumps(messages))
    code, out, err = run_main(["generate", "--checkpoint_dir", str(stories260k_dir), "--adapter",
                               str(bind_files["adapter"]), "--encoder_weights", str(bind_files["encoder"]), "--image",
                               str(bind_files["image"]), "--audio", str(bind_files["audio"]), "--messages",
                               str(tmp_path / "messages.json"), "--temperature", "0", "--max_new_tokens", "24",
                               "--json"], capsys, monkeypatch)
    assert code == 0, err
    expected = json.loads(out)
    assert expected["new_tokens"] >= 5  # a real answer, not an immediate EOS

    client = openai.OpenAI(base_url=f"{bind_server.url}/v1", api_key="unused", max_retries=0)
    parts = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": data_url(
        bind_files["image"])}}, audio_part(bind_files["audio"].read_bytes())]
    request = dict(model=MODEL, messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=24)
    answer = client.chat.completions.create(**request)
    assert answer.choices[0].message.content == expected["text"].lstrip()
    assert answer.usage.completion_tokens == expected["new_tokens"]
    assert answer.usage.prompt_tokens == expected["prompt_tokens"]
    streamed = client.chat.completions.create(**request, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected["text"].lstrip()

    # the inputs reach the model, each of them: text only, the image alone and the audio alone all answer otherwise
    others = [post(bind_server, messages).json(), post(bind_server, user(parts[1])).json(),
              post(bind_server, user(parts[2])).json()]
    texts = {other["choices"][0]["message"]["content"] for other in others}
    assert len(texts) == 3 and answer.choices[0].message.content not in texts


def test_refused_inputs_are_one_line_400s_and_the_server_goes_on(bind_server, bind_files) -> None:
    before = health(bind_server)
    message = refused(post(bind_server, [{"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": "Hello."},
                                         {"role": "user", "content": [audio_part(b"RIFF not really a wave file")]}]),
                      "messages[2].content[0]: cannot read audio")
    assert "lit-adapter-serve-" not in message  # the temporary file is not named
    refused(post(bind_server, user(audio_part(bind_files["audio"].read_bytes(), "ogg"))),
            "messages[0].content[1].input_audio.format", "'ogg'")
    refused(post(bind_server, user({"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}})),
            "messages[0].content[1].input_audio.data", "base64")
    refused(post(bind_server, user({"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                                                       base64.b64encode(b"\x89PNG junk").decode()}})),
            "messages[0].content[1]: cannot read image")
    refused(post(bind_server, user({"type": "image_url", "image_url": {"url": str(bind_files["image"])}})),
            "messages[0].content[1]: local image paths are off")
    refused(post(bind_server, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
        audio_part(bind_files["audio"].read_bytes())]}, {"role": "user", "content": "Hi"}]),
            "messages[1].content[0]: audio inputs go in user messages only")
    good = post(bind_server, user(audio_part(bind_files["audio"].read_bytes())))
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1
    after = health(bind_server)
    assert after["status"] == "ok" and after["failed"] == before["failed"] == 0
    assert after["completed"] == before["completed"] + 1  # nothing refused was queued


def test_models_that_take_no_audio(stories260k_dir, serve_adapter, bind_files, images) -> None:
    audio = audio_part(bind_files["audio"].read_bytes())
    with running_server(stories260k_dir, serve_adapter) as clip:  # a CLIP visual adapter
        refused(post(clip, user(audio)), "messages[0].content[1]: audio needs an ImageBind-LLM adapter")
        assert post(clip, user({"type": "image_url", "image_url": {"url": data_url(images["red"])}})).status_code == 200
    with running_server(stories260k_dir, bind_files["adapter"]) as bare:  # ImageBind-LLM without its encoder
        for part in (audio, {"type": "image_url", "image_url": {"url": data_url(images["red"])}}):
            refused(post(bare, user(part)), "messages[0].content[1]", "without its ImageBind encoder",
                    "--encoder_weights")
        assert post(bare, [{"role": "user", "content": "Hi"}]).status_code == 200
    with pytest.raises(LitAdapterError, match="--encoder_weights: needs an ImageBind-LLM adapter"):
        with running_server(stories260k_dir, serve_adapter, encoder_weights=bind_files["encoder"]):
            pass


def test_alpaca_conversation_equals_chat(stories260k_dir, bind_files, capsys, monkeypatch) -> None:
    """`--prompt_style alpaca` (single-turn) takes a two-turn conversation as `lit-adapter chat` renders it."""
    first, second = "Tell me a story about a cat.", "What did the cat eat?"
    settings = dict(temperature=0, max_tokens=30)
    with running_server(stories260k_dir, prompt_style="alpaca") as server:
        refused(post(server, user(audio_part(bind_files["audio"].read_bytes()))),
                "audio needs an ImageBind-LLM adapter")  # a text-only model
        reply = post(server, [{"role": "user", "content": first}], **settings).json()["choices"][0]["message"]
        conversation = [{"role": "user", "content": first}, {"role": "assistant", "content": reply["content"].strip()},
                        {"role": "user", "content": second}]
        answer = post(server, conversation, **settings).json()["choices"][0]["message"]["content"]
    code, out, err = run_main(["chat", "--checkpoint_dir", str(stories260k_dir), "--prompt_style", "alpaca",
                               "--temperature", "0", "--max_new_tokens", "30"], capsys, monkeypatch,
                              stdin=f"{first}\n{second}\n")
    assert code == 0, err
    assert out == f"{reply['content']}\n{answer}\n"
    assert answer and answer != reply["content"]
