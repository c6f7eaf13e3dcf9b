"""Every fault of the client's is a 4xx OpenAI-shaped JSON error and the server goes on answering; the API key
(on and off, constant-time compared); the bounded queue answers 503 when full."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.serving.conftest import MODEL, data_url, health, running_server

KEY = "sk-test-0123456789"
CHAT = "/v1/chat/completions"
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 4}
LONG_PROMPT = "Once upon a time there was a little cat. " * 120  # far past stories260K's 512-token context


def chat(**changes) -> dict:
    return {**GOOD, **changes}


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


TEXT = {"type": "text", "text": "What is this?"}
ANY = "any"  # the error may name any field

# (name, method, path, body: dict or raw bytes, status, the error's param or None)
BAD_REQUESTS = [
    ("invalid JSON", "POST", CHAT, b'{"model": "tiny", "messages": [', 400, None),
    ("body not an object", "POST", CHAT, b"[1, 2, 3]", 400, None),
    ("body not UTF-8", "POST", CHAT, b'{"model": "\xff"}', 400, None),
    ("no messages", "POST", CHAT, {"model": MODEL}, 400, "messages"),
    ("empty messages", "POST", CHAT, chat(messages=[]), 400, "messages"),
    ("unknown model", "POST", CHAT, chat(model="gpt-17"), 404, "model"),
    ("negative temperature", "POST", CHAT, chat(temperature=-1), 400, "temperature"),
    ("temperature not a number", "POST", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("top_p zero", "POST", CHAT, chat(top_p=0), 400, "top_p"),
    ("max_tokens zero", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("n of two", "POST", CHAT, chat(n=2), 400, "n"),
    ("logprobs", "POST", CHAT, chat(logprobs=True), 400, "logprobs"),
    ("tools", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("unknown role", "POST", CHAT, chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages.0.role"),
    ("roles out of turn", "POST", CHAT, chat(messages=[{"role": "assistant", "content": "Hi"}]), 400, None),
    ("content a number", "POST", CHAT, chat(messages=[{"role": "user", "content": 7}]), 400, ANY),
    ("prompt longer than the context", "POST", CHAT, chat(messages=[{"role": "user", "content": LONG_PROMPT}]),
     400, None),
    ("audio part", "POST", CHAT, chat(messages=user(TEXT, {"type": "input_audio", "input_audio": {"data": "AA=="}})),
     400, None),
    ("image URL over http (flag off)", "POST", CHAT,
     chat(messages=user(TEXT, {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/cat.png"}})), 400, None),
    ("image path (flag off)", "POST", CHAT,
     chat(messages=user(TEXT, {"type": "image_url", "image_url": {"url": "/etc/hostname"}})), 400, None),
    ("data URL not base64", "POST", CHAT,
     chat(messages=user(TEXT, {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}})), 400, None),
    ("data URL not an image", "POST", CHAT,
     chat(messages=user(TEXT, {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}})), 400, None),
    ("corrupt image", "POST", CHAT, chat(messages=user(TEXT, {"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n not really").decode()}})), 400, None),
    ("image in an assistant message", "POST", CHAT, chat(messages=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,AA=="}}]}, {"role": "user", "content": "Hi"}]), 400, None),
    ("completion prompt missing", "POST", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("two completion prompts", "POST", "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("completion echo", "POST", "/v1/completions", {"model": MODEL, "prompt": "a", "echo": True}, 400, "echo"),
    ("oversized body", "POST", CHAT, chat(messages=[{"role": "user", "content": "x" * (2 * 2**20)}]), 413, None),
    ("unknown route", "GET", "/v1/engines", None, 404, None),
    ("wrong method", "GET", CHAT, None, 405, None),
    ("unknown model (models endpoint)", "GET", f"/v1/models/{'gpt-17'}", None, 404, "model"),
]


@pytest.fixture(scope="module")
def server(stories260k_dir: Path, serve_adapter: Path):
    with running_server(stories260k_dir, serve_adapter, max_body_mb=1) as running:
        yield running


@pytest.fixture(scope="module")
def keyed(stories260k_dir: Path):
    """The base model (no visual encoder) behind an API key, with a batch of one and a queue of one."""
    with running_server(stories260k_dir, api_key=KEY, max_batch_size=1, max_queue=1) as running:
        yield running


@pytest.mark.parametrize("name, method, path, body, status, param", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_request_is_a_4xx_json_error(server, name, method, path, body, status, param) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
    response = httpx.request(method, f"{server.url}{path}", content=content, timeout=30,
                             headers={"Content-Type": "application/json"} if content is not None else {})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"]
    assert error["param"] == param or param == ANY and error["param"].startswith("messages.0.content")
    if status == 413:
        assert error["code"] == "request_too_large"


def test_oversized_body_without_a_length_is_refused_as_it_streams(server) -> None:
    def chunks():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 2**16  # 2.5 MiB in all, sent chunked (no Content-Length)
        yield b'"}]}'

    response = httpx.post(f"{server.url}{CHAT}", content=chunks(), timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_server_still_answers_after_the_bad_requests(server) -> None:
    """(runs after the table) the same process still serves, and nothing ended as a 500."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(**GOOD)
    assert answer.choices[0].message.content and answer.usage.completion_tokens >= 1
    state = health(server)
    assert state["status"] == "ok" and state["failed"] == 0


def test_bad_request_through_the_openai_client(server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(**chat(model="gpt-17"))
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**chat(temperature=5))


def test_image_to_a_model_without_a_visual_encoder(keyed, images) -> None:
    body = chat(messages=user(TEXT, {"type": "image_url", "image_url": {"url": data_url(images["red"])}}))
    response = httpx.post(f"{keyed.url}{CHAT}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert response.status_code == 400
    assert "no visual encoder" in response.json()["error"]["message"]


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Basic {KEY}", "Bearer", f"Bearer {KEY}x", KEY])
def test_api_key_required(keyed, header) -> None:
    headers = {"Authorization": header} if header is not None else {}
    for method, path in [("GET", "/v1/models"), ("POST", CHAT), ("POST", "/v1/completions")]:
        response = httpx.request(method, f"{keyed.url}{path}", json=GOOD, headers=headers, timeout=30)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_api_key_accepted(keyed) -> None:
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0)
    assert client.chat.completions.create(**GOOD).choices[0].message.content is not None
    assert httpx.get(f"{keyed.url}/health", timeout=10).status_code == 200  # health and the page need no key
    assert httpx.get(f"{keyed.url}/", timeout=10).status_code == 200


def test_no_api_key_means_open(server) -> None:
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 200


def test_full_queue_answers_503(keyed) -> None:
    """A batch of one and a queue of one: while one long request decodes, of two more one waits and one is turned
    away at once."""
    long = {"model": MODEL, "prompt": "Once upon a time", "temperature": 1.0, "seed": 1, "max_tokens": 250}
    short = {**long, "max_tokens": 4}

    async def scenario():
        async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
            first = asyncio.create_task(client.post(f"{keyed.url}/v1/completions", json=long))
            while (await client.get(f"{keyed.url}/health")).json()["active"] == 0:
                await asyncio.sleep(0.01)
            later = await asyncio.gather(*(client.post(f"{keyed.url}/v1/completions", json=short) for _ in range(2)))
            return [await first, *later]

    responses = asyncio.run(scenario())
    assert responses[0].status_code == 200 and responses[0].json()["usage"]["completion_tokens"] > 100
    assert sorted(response.status_code for response in responses[1:]) == [200, 503]
    busy = next(response for response in responses if response.status_code == 503)
    assert busy.json()["error"]["code"] == "server_overloaded" and busy.headers["retry-after"] == "1"
