"""A LangChain chat model that runs a checkpoint (+ adapter) in this process, with no server.

    from lit_adapter.integrations.langchain import LitAdapterChat

    chat = LitAdapterChat(checkpoint_dir="checkpoints/llama-7b", adapter="out/adapter", temperature=0)
    chat.invoke("Tell me a story")
    for chunk in chat.stream("Tell me a story"): ...

Messages are rendered as the server renders them (`lit_adapter.serving.prompting`: the adapter's multi-turn style,
else the checkpoint's chat template, else the V2 chat template), images included (`image_url` parts: data URLs and
local paths; http(s) URLs with `allow_image_urls`). Decoding goes through the engine's `stream`, one generation at a
time per model object. Needs `langchain-core`.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import PrivateAttr

ROLES = {"system": "system", "human": "user", "ai": "assistant", "chat": None}


class LitAdapterChat(BaseChatModel):
    """A `BaseChatModel` over `lit_adapter.inference.engine.Engine` (loaded on first use).

    Fields: checkpoint_dir, adapter, prompt_style (see `lit-adapter serve --help`), temperature (0 = greedy),
    top_p, top_k, max_tokens, stop, seed (None: a fresh random seed per call), device, precision, allow_image_urls.
    """

    checkpoint_dir: Path
    adapter: Optional[Path] = None
    prompt_style: Optional[str] = None
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: Optional[int] = None
    max_tokens: int = 256
    stop: Optional[list[str]] = None
    seed: Optional[int] = None
    device: str = "auto"
    precision: str = "auto"
    allow_image_urls: bool = False

    _engine: Any = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    @property
    def _llm_type(self) -> str:
        return "lit-adapter"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"checkpoint_dir": str(self.checkpoint_dir), "adapter": self.adapter and str(self.adapter),
                "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "max_tokens": self.max_tokens}

    @property
    def engine(self) -> Any:
        if self._engine is None:
            from lit_adapter.serving.cli import load_engine

            self._engine = load_engine(self.checkpoint_dir, self.adapter, self.prompt_style, self.device,
                                       self.precision)
        return self._engine

    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        pieces, info = [], {}
        for chunk in self._stream(messages, stop, run_manager, **kwargs):
            pieces.append(chunk.text)
            info = chunk.generation_info or info
        message = AIMessage(content="".join(pieces), usage_metadata=info.pop("usage_metadata", None),
                            response_metadata=dict(info))
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])

    def _stream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        import torch

        from lit_adapter.inference.engine import CHAT_DECODING, Completion, resolve_decoding
        from lit_adapter.serving.images import ImagePolicy, visual_tokens
        from lit_adapter.serving.prompting import chat_ids, check_fits, split_images

        engine = self.engine
        plain, image = split_images(engine, [to_openai(m) for m in messages],
                                    ImagePolicy(allow_paths=True, allow_urls=self.allow_image_urls))
        ids = chat_ids(engine, plain)
        check_fits(engine, ids.numel())
        options = {**self._identifying_params, **kwargs}
        decoding = resolve_decoding(replace(CHAT_DECODING, stop=engine.style.stop_sequences), options["max_tokens"],
                                    options["temperature"], options["top_k"], options["top_p"],
                                    [*(self.stop or ()), *(stop or ())])
        seed = kwargs.get("seed", self.seed)
        generator = torch.Generator(device=engine.device).manual_seed(seed if seed is not None else
                                                                      secrets.randbits(63))
        completion = Completion(prompt_tokens=ids.numel())
        started = False  # the reply's leading whitespace is not part of the answer (as in `lit-adapter chat`)
        with self._lock:
            visual = visual_tokens(engine, image) if image is not None else None
            for piece in engine.stream(ids, decoding, visual, generator, completion):
                piece = piece if started else piece.lstrip()
                if not piece:
                    continue
                started = True
                if run_manager is not None:
                    run_manager.on_llm_new_token(piece)
                yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        usage = {"input_tokens": completion.prompt_tokens, "output_tokens": completion.new_tokens,
                 "total_tokens": completion.prompt_tokens + completion.new_tokens}
        yield ChatGenerationChunk(
            message=AIMessageChunk(content="", usage_metadata=usage),
            generation_info={"finish_reason": "length" if completion.finish == "length" else "stop",
                             "usage_metadata": usage},
        )


def to_openai(message: BaseMessage) -> dict[str, Any]:
    """A LangChain message as an OpenAI-style one (content strings or text/image_url parts pass as they are)."""
    role = ROLES.get(message.type, "") if message.type != "chat" else getattr(message, "role", "")
    return {"role": role or message.type, "content": message.content}
