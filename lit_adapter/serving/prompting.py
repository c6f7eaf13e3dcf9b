"""From an OpenAI-style conversation (text and image parts) to the prompt ids and image a generation starts from;
shared by the server and the in-process LangChain model.

The conversation is rendered by the engine's multi-turn style (`lit_adapter.inference.chat.conversation_ids`: the
adapter's template if it is multi-turn, else the checkpoint's chat template, else the V2 chat template), so the
server's prompt is the one `lit-adapter generate --messages` builds. A single-turn style (e.g. `--prompt_style
alpaca`) takes a conversation of one user message (after an optional system message, which it has no place for).
The model sees one image per generation: the last one in the conversation, as in `lit-adapter chat`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from lit_adapter.chat_template import content_text
from lit_adapter.errors import LitAdapterError
from lit_adapter.serving.images import ImagePolicy, check_takes_images, decode_image, image_bytes

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def split_images(engine: Any, messages: Sequence[dict], policy: ImagePolicy) -> tuple[list[dict], Optional[Any]]:
    """The messages with text content only, and the last image (decoded, RGB) or None."""
    plain: list[dict] = []
    image = None
    for index, message in enumerate(messages):
        role = ROLES.get(message.get("role"))
        if role is None:
            raise LitAdapterError(f"messages[{index}].role: {message.get('role')!r} is not one of system, developer, "
                                  "user, assistant")
        content = message.get("content")
        if isinstance(content, list):
            content, found = _parts(engine, content, role, policy, f"messages[{index}].content")
            image = found if found is not None else image
        elif content is not None and not isinstance(content, str):
            raise LitAdapterError(f"messages[{index}].content must be a string or a list of parts")
        plain.append({"role": role, "content": content or ""})
    return plain, image


def _parts(engine: Any, parts: list, role: str, policy: ImagePolicy, where: str) -> tuple[str, Optional[Any]]:
    texts, image = [], None
    for index, part in enumerate(parts):
        label = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise LitAdapterError(f"{label}: images go in user messages only")
            check_takes_images(engine, label)
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            image = decode_image(image_bytes(url, policy, label), label)
        else:
            raise LitAdapterError(f"{label}: unsupported content part {kind!r}; parts are {{'type': 'text', 'text': "
                                  "...} or {'type': 'image_url', 'image_url': {'url': 'data:image/...'}}")
    return "".join(texts), image


def chat_ids(engine: Any, messages: Sequence[dict]) -> Any:
    """Prompt ids [T] answering text-only `messages` in the engine's style."""
    from lit_adapter.inference.chat import conversation_ids

    if engine.style.multi_turn:
        return conversation_ids(engine, messages)
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) != 1 or turns[0]["role"] != "user":
        raise LitAdapterError(f"messages: prompt style {engine.style.name!r} takes one user message (it has no "
                              "multi-turn form); serve with --prompt_style chat or chat_template for conversations")
    return engine.encode(engine.format(content_text(turns[0]["content"])))


def check_fits(engine: Any, prompt_tokens: int) -> None:
    if prompt_tokens >= engine.context_length:
        raise LitAdapterError(f"the prompt is {prompt_tokens} tokens, the model's context is {engine.context_length}: "
                              "shorten the conversation")
