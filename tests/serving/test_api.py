"""The OpenAI endpoints through the official `openai` client (sync, async, streaming): greedy and seeded answers
equal `lit-adapter generate`'s token for token, alone and with eight requests of different settings decoded
together; images as data URLs; usage counts; a client that goes away has its generation cancelled."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.serving.conftest import MODEL, data_url, generate_json, health, running_server

STORY = [{"role": "user", "content": "Tell me a story about a cat"}]


@pytest.fixture(scope="module")
def server(stories260k_dir: Path, serve_adapter: Path):
    with running_server(stories260k_dir, serve_adapter, max_batch_size=8, allow_image_paths=True,
                        allow_image_urls=True) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def reference(stories260k_dir: Path, adapter: Path, tmp_path: Path, messages=None, prompt=None, image=None,
              **settings) -> dict:
    """What `lit-adapter generate` answers with the same conversation (or raw prompt) and settings."""
    args = [item for name, value in settings.items() for item in (f"--{name}", value)]
    if image is not None:
        args += ["--image", image]
    if prompt is not None:
        return generate_json(stories260k_dir, adapter, "--prompt", prompt, "--prompt_style", "raw", *args)
    return generate_json(stories260k_dir, adapter, *args, messages=messages, tmp_path=tmp_path)


def test_models_and_health(client: openai.OpenAI, server) -> None:
    assert [model.id for model in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert health(server)["status"] == "ok"


def test_chat_greedy_equals_generate(client, stories260k_dir, serve_adapter, tmp_path) -> None:
    expected = reference(stories260k_dir, serve_adapter, tmp_path, STORY, temperature=0, max_new_tokens=40)
    answer = client.chat.completions.create(model=MODEL, messages=STORY, temperature=0, max_tokens=40)
    assert expected["new_tokens"] >= 5  # a real answer, not an immediate EOS
    base = reference(stories260k_dir, None, tmp_path, STORY, temperature=0, max_new_tokens=40)
    assert base["text"] != expected["text"]  # the adapter changes the answer
    assert answer.choices[0].message.content == expected["text"].lstrip()  # the chat shows no leading space
    assert answer.usage.prompt_tokens == expected["prompt_tokens"]
    assert answer.usage.completion_tokens == expected["new_tokens"]
    assert answer.usage.total_tokens == expected["prompt_tokens"] + expected["new_tokens"]
    assert answer.choices[0].finish_reason == ("length" if expected["finish"] == "length" else "stop")


def test_multi_turn_with_system_message(client, stories260k_dir, serve_adapter, tmp_path) -> None:
    messages = [{"role": "system", "content": "You tell short stories."}, *STORY,
                {"role": "assistant", "content": "Once upon a time there was a cat."},
                {"role": "user", "content": [{"type": "text", "text": "What was its "}, {"type": "text",
                                                                                      "text": "name?"}]}]
    expected = reference(stories260k_dir, serve_adapter, tmp_path, messages, temperature=0, max_new_tokens=30)
    answer = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                            max_completion_tokens=30)
    assert answer.choices[0].message.content == expected["text"].lstrip()
    assert answer.usage.prompt_tokens == expected["prompt_tokens"]


def test_image_data_url_equals_generate_image(client, stories260k_dir, serve_adapter, images, tmp_path) -> None:
    question = "What is in the picture?"
    answers = {}
    for name, path in images.items():
        expected = reference(stories260k_dir, serve_adapter, tmp_path, [{"role": "user", "content": question}],
                             image=path, temperature=0, max_new_tokens=24)
        content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": data_url(path)}}]
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                temperature=0, max_tokens=24)
        assert answer.choices[0].message.content == expected["text"].lstrip()
        assert answer.usage.completion_tokens == expected["new_tokens"]
        answers[name] = expected["text"]
    assert answers["red"] != answers["blue"]  # the pixels reach the model


def test_image_paths_and_urls_when_allowed(client, images, tmp_path) -> None:
    """With --allow_image_paths and --allow_image_urls, a file path, a file:// URL and an http URL give the answer
    the same image gives as a data URL."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(images["red"].parent))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        urls = [data_url(images["red"]), str(images["red"]), images["red"].as_uri(),
                f"http://127.0.0.1:{files.server_address[1]}/{images['red'].name}"]
        answers = []
        for url in urls:
            content = [{"type": "text", "text": "What is in the picture?"},
                       {"type": "image_url", "image_url": {"url": url}}]
            answers.append(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                          temperature=0, max_tokens=12).choices[0].message.content)
    finally:
        files.shutdown()
    assert len(set(answers)) == 1 and answers[0]


def test_streaming_chat_equals_whole_answer(client, stories260k_dir, serve_adapter, tmp_path) -> None:
    expected = reference(stories260k_dir, serve_adapter, tmp_path, STORY, temperature=0, max_new_tokens=40)
    stream = client.chat.completions.create(model=MODEL, messages=STORY, temperature=0, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3  # streamed piece by piece
    assert "".join(pieces) == expected["text"].lstrip()
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length" if expected["finish"] == "length" else "stop"]
    assert chunks[-1].usage.completion_tokens == expected["new_tokens"]


def test_stream_ends_with_done(server) -> None:
    body = {"model": MODEL, "messages": STORY, "temperature": 0, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"


def test_completions_equal_generate_raw(client, stories260k_dir, serve_adapter, tmp_path) -> None:
    expected = reference(stories260k_dir, serve_adapter, tmp_path, prompt="Once upon a time", temperature=0,
                         max_new_tokens=30, stop="park")
    answer = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=30,
                                       stop=["park"])
    assert answer.choices[0].text == expected["text"]
    assert answer.usage.completion_tokens == expected["new_tokens"]
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=30,
                                         stop=["park"], stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected["text"]


# eight requests decoded together, each with its own sampling, length and stop strings (top_p always given: the
# defaults of `generate` with an adapter and of a chat differ)
SETTINGS = [
    dict(temperature=0, max_tokens=40),
    dict(temperature=0, max_tokens=7),
    dict(temperature=0, max_tokens=40, stop=["."]),
    dict(temperature=0.9, top_p=0.9, seed=11, max_tokens=30),
    dict(temperature=1.2, top_p=1.0, seed=5, max_tokens=35),
    dict(temperature=0.7, top_p=0.5, top_k=20, seed=3, max_tokens=25),
    dict(temperature=0, max_tokens=30, content="Hi"),
    dict(temperature=1.0, top_p=0.8, seed=99, max_tokens=40, stop=["the"], content="Write a poem about a dog"),
]


def test_eight_concurrent_requests_equal_generate(server, stories260k_dir, serve_adapter, tmp_path) -> None:
    requests, expected = [], []
    for settings in SETTINGS:
        settings = dict(settings)
        messages = [{"role": "user", "content": settings.pop("content", STORY[0]["content"])}]
        cli = {("max_new_tokens" if k == "max_tokens" else k): v for k, v in settings.items() if k != "stop"}
        args = [*(item for stop in settings.get("stop", []) for item in ("--stop", stop))]
        record = generate_json(stories260k_dir, serve_adapter, *args,
                               *(item for k, v in cli.items() for item in (f"--{k}", v)), messages=messages,
                               tmp_path=tmp_path)
        expected.append(record)
        extra = {"top_k": settings.pop("top_k")} if "top_k" in settings else {}
        requests.append(dict(model=MODEL, messages=messages, extra_body=extra, **settings))
    before = health(server)["peak_batch"]

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(client.chat.completions.create(**request) for request in requests))

    answers = asyncio.run(run_all())
    for answer, record in zip(answers, expected, strict=True):
        assert answer.choices[0].message.content == record["text"].lstrip()
        assert answer.usage.completion_tokens == record["new_tokens"]
    assert len({record["text"] for record in expected}) == len(expected)  # eight different answers
    assert health(server)["peak_batch"] > max(before, 1)  # decoded together, not one after another


def test_disconnect_cancels_the_generation(server, client) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "temperature": 1.0, "seed": 1, "max_tokens": 250}
    whole = client.completions.create(**body)
    assert whole.usage.completion_tokens > 150  # left alone, this generation runs long
    before = health(server)["cancelled"]
    body["stream"] = True
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")
    deadline = time.monotonic() + 10
    while health(server)["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    state = health(server)
    assert state["cancelled"] == before + 1 and state["active"] == 0


def test_disconnect_while_waiting_for_a_whole_answer_cancels_it(server) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "temperature": 1.0, "seed": 1, "max_tokens": 500}
    before = health(server)["cancelled"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.2)  # the client gives up and hangs up
    deadline = time.monotonic() + 10
    while health(server)["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    state = health(server)
    assert state["cancelled"] == before + 1 and state["active"] == 0
