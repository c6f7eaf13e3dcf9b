"""LangChain: `langchain-openai`'s ChatOpenAI against the server (invoke, stream), and the in-process chat model
`lit_adapter.integrations.langchain.LitAdapterChat` (invoke, stream, an image); greedy answers equal
`lit-adapter generate`'s."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from lit_adapter.integrations.langchain import LitAdapterChat
from tests.serving.conftest import MODEL, data_url, generate_json, running_server

QUESTION = "Tell me a story about a dog"
CONVERSATION = [SystemMessage("You tell short stories."), HumanMessage(QUESTION),
                AIMessage("Once upon a time there was a dog."), HumanMessage("What did it eat?")]
OPENAI_CONVERSATION = [{"role": "system", "content": "You tell short stories."}, {"role": "user", "content": QUESTION},
                       {"role": "assistant", "content": "Once upon a time there was a dog."},
                       {"role": "user", "content": "What did it eat?"}]


@pytest.fixture(scope="module")
def server(stories260k_dir: Path, serve_adapter: Path):
    with running_server(stories260k_dir, serve_adapter) as running:
        yield running


@pytest.fixture(scope="module")
def expected(stories260k_dir: Path, serve_adapter: Path, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("langchain")
    one = generate_json(stories260k_dir, serve_adapter, "--temperature", 0, "--max_new_tokens", 30,
                        messages=[{"role": "user", "content": QUESTION}], tmp_path=folder)
    many = generate_json(stories260k_dir, serve_adapter, "--temperature", 0, "--max_new_tokens", 30,
                         messages=OPENAI_CONVERSATION, tmp_path=folder)
    assert one["new_tokens"] >= 5 and one["text"] != many["text"]
    return {"one": one["text"].lstrip(), "many": many["text"].lstrip(), "tokens": one["new_tokens"]}


def test_chat_openai_invoke_and_stream(server, expected) -> None:
    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=30,
                     max_retries=0)
    answer = llm.invoke(QUESTION)
    assert answer.content == expected["one"]
    assert answer.usage_metadata["output_tokens"] == expected["tokens"]
    assert llm.invoke(CONVERSATION).content == expected["many"]
    chunks = list(llm.stream(QUESTION))
    assert len([c for c in chunks if c.content]) > 3
    assert "".join(c.content for c in chunks) == expected["one"]


def test_in_process_chat_model(stories260k_dir, serve_adapter, expected, images, tmp_path) -> None:
    llm = LitAdapterChat(checkpoint_dir=str(stories260k_dir), adapter=str(serve_adapter), temperature=0,
                         max_tokens=30)
    answer = llm.invoke(QUESTION)
    assert answer.content == expected["one"]
    assert answer.usage_metadata["output_tokens"] == expected["tokens"]
    assert answer.response_metadata["finish_reason"] in ("stop", "length")
    assert llm.invoke(CONVERSATION).content == expected["many"]
    chunks = list(llm.stream(QUESTION))
    assert len([c for c in chunks if c.content]) > 3
    assert "".join(c.content for c in chunks) == expected["one"]

    seeing = generate_json(stories260k_dir, serve_adapter, "--temperature", 0, "--max_new_tokens", 20, "--image",
                           images["blue"], messages=[{"role": "user", "content": "What is this?"}], tmp_path=tmp_path)
    message = HumanMessage(content=[{"type": "text", "text": "What is this?"},
                                    {"type": "image_url", "image_url": {"url": data_url(images["blue"])}}])
    assert llm.invoke([message], max_tokens=20).content == seeing["text"].lstrip()
