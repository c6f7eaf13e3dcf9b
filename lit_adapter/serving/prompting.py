"""From an OpenAI-style conversation (text and image parts) to the prompt ids and image a generation starts from;
shared by the server and the in-process LangChain model.

The conversation is rendered by the engine's multi-turn style (`lit_adapter.inference.chat.conversation_ids`: the
adapter's template, a single-turn one such as alpaca in its multi-turn form, else the checkpoint's chat template,
else the V2 chat template), so the server's prompt is the one `lit-adapter generate --messages` builds and the one
`lit-adapter chat` builds for the same turns. A style without a multi-turn form (`--prompt_style raw`) takes a
conversation of one user message (after an optional system message, which it has no place for).
A CLIP visual adapter sees one image per generation: the last one in the conversation, as in `lit-adapter chat`; an
ImageBind-LLM adapter sees every image and audio input of the conversation, mixed with equal weights
(`serving.media`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from lit_adapter.chat_template import content_text
from lit_adapter.errors import LitAdapterError
from lit_adapter.media.inputs import NEEDS_BIND
from lit_adapter.serving.images import ImagePolicy, check_takes_images, decode_image, image_bytes
from lit_adapter.serving.media import AUDIO_PART, BindInputs, audio_bytes, check_encoder, image_suffix

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def split_images(engine: Any, messages: Sequence[dict], policy: ImagePolicy) -> tuple[list[dict], Optional[Any]]:
    """The messages with text content only, and what the model sees: the last image (decoded, RGB) for a CLIP
    visual adapter; for an ImageBind-LLM adapter every image and audio input of the conversation, preprocessed
    (`serving.media.BindInputs`); None without any."""
    plain: list[dict] = []
    image = None
    inputs = BindInputs()
    for index, message in enumerate(messages):
        role = ROLES.get(message.get("role"))
        if role is None:
            raise LitAdapterError(f"messages[{index}].role: {message.get('role')!r} is not one of system, developer, "
                                  "user, assistant")
        content = message.get("content")
        if isinstance(content, list):
            content, found = _parts(engine, content, role, policy, f"messages[{index}].content", inputs)
            image = found if found is not None else image
        elif content is not None and not isinstance(content, str):
            raise LitAdapterError(f"messages[{index}].content must be a string or a list of parts")
        plain.append({"role": role, "content": content or ""})
    return plain, inputs if inputs.inputs else image


def _parts(engine: Any, parts: list, role: str, policy: ImagePolicy, where: str,
           inputs: BindInputs) -> tuple[str, Optional[Any]]:
    """The parts' text and their last image for a CLIP adapter; an ImageBind-LLM adapter's inputs join `inputs`."""
    texts, image = [], None
    for index, part in enumerate(parts):
        label = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_audio") and role != "user":
            raise LitAdapterError(f"{label}: {'images' if kind == 'image_url' else 'audio inputs'} go in user "
                                  "messages only")
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if check_takes_images(engine, label) == "bind":
                inputs.add("image", image_bytes(url, policy, label), image_suffix(url), label)
            else:
                image = decode_image(image_bytes(url, policy, label), label)
        elif kind == "input_audio":
            if not engine.binds:
                raise LitAdapterError(f"{label}: audio {NEEDS_BIND}; this model takes no audio")
            check_encoder(engine, label)
            inputs.add("audio", *audio_bytes(part, label), label)
        else:
            raise LitAdapterError(f"{label}: unsupported content part {kind!r}; parts are {{'type': 'text', 'text': "
                                  "...}, {'type': 'image_url', 'image_url': {'url': 'data:image/...'}} or "
                                  f"(ImageBind-LLM) {AUDIO_PART}")
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
