"""The chat page in a real headless browser (Debian's chromium driven by playwright, no browser download): a
message with an uploaded image streams an answer equal to the API's; a second turn keeps the conversation; the stop
button ends an answer; a screenshot is saved; an ImageBind-LLM adapter's page sends an uploaded audio file with the
image and answers as the API does."""

from __future__ import annotations

import os
from pathlib import Path

import openai
import pytest
from playwright.sync_api import expect, sync_playwright

from tests.serving.conftest import MODEL, data_url, running_server
from tests.serving.test_bind_inputs import QUESTION, audio_part, bind_files, bind_server, post  # noqa: F401

CHROMIUM = os.environ.get("LIT_ADAPTER_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def server(stories260k_dir: Path, serve_adapter: Path):
    with running_server(stories260k_dir, serve_adapter) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"chromium not found at {CHROMIUM}: apt-get install chromium (or set LIT_ADAPTER_CHROMIUM)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.goto(url)
    expect(page.locator("#model")).to_have_text(MODEL)
    return page


@pytest.fixture(scope="module")
def page(browser, server):
    return open_page(browser, server.url)


def api_answer(server, messages: list[dict], max_tokens: int) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens)
    return answer.choices[0].message.content


def send(page, text: str) -> object:
    """Type and send a message; the new assistant bubble once its answer is complete."""
    count = page.locator(".message.assistant").count()
    page.fill("#message", text)
    page.click("#send")
    bubble = page.locator(".message.assistant").nth(count)
    expect(bubble).to_have_attribute("data-done", "true", timeout=30_000)
    return bubble


def test_chat_page_streams_the_api_answer_with_an_image(page, server, images, tmp_path) -> None:
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "30")
    page.set_input_files("#image", str(images["red"]))
    expect(page.locator("#preview")).to_be_visible()
    first = send(page, "What is in the picture?")
    shown = first.locator(".text").inner_text()
    content = [{"type": "text", "text": "What is in the picture?"},
               {"type": "image_url", "image_url": {"url": data_url(images["red"])}}]
    conversation = [{"role": "user", "content": content}]
    expected = api_answer(server, conversation, 30)
    assert shown == expected and shown
    assert int(first.get_attribute("data-chunks")) > 1  # it arrived in pieces
    assert page.locator(".message.user img").count() == 1  # the uploaded image is shown with the message
    expect(page.locator("#preview")).to_be_hidden()

    second = send(page, "And what else?")  # the page sends the whole conversation, image included
    conversation += [{"role": "assistant", "content": shown}, {"role": "user", "content": "And what else?"}]
    assert second.locator(".text").inner_text() == api_answer(server, conversation, 30)

    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert (tmp_path / "chat.png").stat().st_size > 1000


def test_stop_button_ends_the_answer(page, server) -> None:
    story = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story"}],
             "temperature": 1.0, "seed": 7, "max_tokens": 300}
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    whole = client.chat.completions.create(**story).usage.completion_tokens
    assert whole > 150  # left alone, this answer runs long
    page.click("#reset")
    page.fill("#temperature", "1")
    page.fill("#seed", "7")
    page.fill("#max_tokens", "300")
    page.fill("#message", "Tell me a very long story")
    page.click("#send")
    bubble = page.locator(".message.assistant").first
    expect(bubble.locator(".text")).not_to_have_text("", timeout=30_000)
    page.click("#stop")
    expect(bubble).to_have_attribute("data-stopped", "true", timeout=10_000)
    expect(page.locator("#send")).to_be_enabled()


def test_an_imagebind_llm_page_sends_the_audio_with_the_image(browser, bind_server, bind_files) -> None:  # noqa: F811
    bind_page = open_page(browser, bind_server.url)
    bind_page.fill("#temperature", "0")
    bind_page.fill("#max_tokens", "24")
    bind_page.set_input_files("#image", str(bind_files["image"]))
    bind_page.set_input_files("#audio", str(bind_files["audio"]))
    expect(bind_page.locator("#audio_name")).to_have_text("b.wav")
    bubble = send(bind_page, QUESTION)
    parts = [{"type": "image_url", "image_url": {"url": data_url(bind_files["image"])}},
             audio_part(bind_files["audio"].read_bytes())]
    answer = post(bind_server, [{"role": "user", "content": [{"type": "text", "text": QUESTION}, *parts]}])
    assert bubble.locator(".text").inner_text() == answer.json()["choices"][0]["message"]["content"]
    assert bind_page.locator(".message.user .audio").inner_text() == " [audio: b.wav]"
    expect(bind_page.locator("#audio_name")).to_be_hidden()  # sent with this message only
