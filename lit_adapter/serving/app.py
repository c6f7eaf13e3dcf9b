"""The HTTP side: a FastAPI app over one `Scheduler` (OpenAI endpoints, the chat page, health), run by uvicorn.

FastAPI + uvicorn rather than LitServe: LitServe batches requests that arrive within a window and runs each batch
to completion, while here sequences join and leave a running batch at every decoding step, each with its own
sampling, stop strings and length, and a client that disconnects frees its row at the next step; that loop is ours
(`scheduler.py`), and the web framework only has to parse, stream server-sent events and notice disconnects.

Every fault of the client's answers an OpenAI-shaped JSON error with a 4xx status (400 bad JSON or fields, 401 API
key, 404 model or route, 413 body, 503 queue full); a 500 means a fault of ours, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lit_adapter.errors import LitAdapterError
from lit_adapter.inference.engine import CHAT_DECODING, Decoding, Engine, resolve_decoding
from lit_adapter.serving import protocol
from lit_adapter.serving.images import ImagePolicy
from lit_adapter.serving.prompting import chat_ids, check_fits, split_images
from lit_adapter.serving.protocol import ApiError, ChatRequest, CompletionRequest
from lit_adapter.serving.scheduler import Overloaded, Scheduler
from lit_adapter.serving.scheduler import Request as Job

DISCONNECT_POLL = 0.1  # seconds between checks that a client waiting for a whole answer is still there


@dataclass
class ServerSettings:
    """What the server answers with: its model's name, limits, the decoding defaults a request may override."""

    model_name: str
    api_key: Optional[str] = None
    max_batch_size: int = 16
    max_queue: int = 64
    max_new_tokens: int = 256
    max_body_bytes: int = 16 * 2**20
    images: ImagePolicy = field(default_factory=ImagePolicy)
    chat_defaults: Decoding = CHAT_DECODING  # as `lit-adapter chat`
    completion_defaults: Decoding = Decoding()  # as `lit-adapter generate` (set to the adapter's by the CLI)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 (by its Content-Length, or as it
    streams in)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await too_large(self.limit)(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        await self.app(scope, counted, send)


def too_large(limit: int) -> JSONResponse:
    message = f"the request body is larger than {limit} bytes (--max_body_mb); send a smaller image or prompt"
    return JSONResponse(protocol.error_body(message, code="request_too_large"), status_code=413)


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    """The app serving `engine`; its scheduler starts and stops with the app (uvicorn's lifespan)."""
    scheduler = Scheduler(engine, settings.max_batch_size, settings.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="lit-adapter", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.engine, app.state.settings = scheduler, engine, settings
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    _add_error_handlers(app, settings)
    created = int(time.time())
    model_card = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "lit-adapter"}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("lit_adapter.serving").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = scheduler.thread.is_alive()
        state = {"status": "ok" if alive else "decoding thread stopped", "model": settings.model_name,
                 "active": scheduler.active, "queued": scheduler.queued, "max_batch_size": settings.max_batch_size,
                 **scheduler.stats}
        return JSONResponse(state, status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request, settings)
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict:
        authorize(request, settings)
        check_model(name, settings)
        return model_card

    async def read_request(request: Request, schema: type) -> Any:
        """The request's body as `schema`, once the key, the JSON, the fields and the model name are checked."""
        authorize(request, settings)
        body = protocol.parse(await request.body(), schema)
        body.refuse_unsupported()
        check_model(body.model, settings)
        return body

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await read_request(request, ChatRequest)
        messages = [message.model_dump() for message in body.messages]
        ids, image = await asyncio.to_thread(_chat_prompt, engine, messages, settings.images)
        decoding = request_decoding(replace(settings.chat_defaults, stop=engine.style.stop_sequences), body,
                                    settings.max_new_tokens)
        job = _submit(scheduler, ids, decoding, body.seed, image, lstrip=True)
        return await _answer(job, body, request, settings.model_name, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await read_request(request, CompletionRequest)
        ids = await asyncio.to_thread(_completion_prompt, engine, body.text())
        decoding = request_decoding(settings.completion_defaults, body, settings.max_new_tokens)
        job = _submit(scheduler, ids, decoding, body.seed, None, lstrip=False)
        return await _answer(job, body, request, settings.model_name, chat=False)

    return app


async def _answer(job: Job, body: protocol.Sampling, request: Request, model_name: str, chat: bool) -> Any:
    """The response to a submitted job: server-sent events while it decodes (`stream`), else the whole completion
    (a chat completion or a text completion) once it has ended."""
    if body.stream:
        return _stream(job, body, model_name, chat=chat)
    completion = await _wait(job, request)
    build, prefix = (protocol.chat_completion, "chatcmpl") if chat else (protocol.text_completion, "cmpl")
    return build(protocol.new_id(prefix), model_name, completion.text, completion.finish, completion.prompt_tokens,
                 completion.new_tokens)


def _add_error_handlers(app: FastAPI, settings: ServerSettings) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(_TooLarge)
    async def body_too_large(request: Request, err: _TooLarge) -> JSONResponse:
        return too_large(settings.max_body_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {err.detail}"
        return JSONResponse(protocol.error_body(message, kind), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        message = f"internal error ({type(err).__name__}: {err})"
        return JSONResponse(protocol.error_body(message, "server_error"), status_code=500)


def authorize(request: Request, settings: ServerSettings) -> None:
    """With an API key set, require `Authorization: Bearer <key>` (compared in constant time)."""
    if settings.api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "missing API key: send the header `Authorization: Bearer <key>`",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), settings.api_key.encode()):
        raise ApiError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def check_model(name: Optional[str], settings: ServerSettings) -> None:
    if name is not None and name != settings.model_name:
        raise ApiError(404, f"model {name!r} not found; this server serves {settings.model_name!r} (GET /v1/models)",
                       type="not_found_error", param="model", code="model_not_found")


def request_decoding(defaults: Decoding, body: protocol.Sampling, max_new_tokens: int) -> Decoding:
    length = body.length()
    return _user_error(resolve_decoding, defaults, length if length is not None else max_new_tokens,
                       body.temperature, body.top_k, body.top_p, body.stops())


def _user_error(function: Any, *args: Any) -> Any:
    try:
        return function(*args)
    except LitAdapterError as err:
        raise ApiError(400, str(err)) from None


def _chat_prompt(engine: Engine, messages: list[dict], policy: ImagePolicy) -> tuple[torch.Tensor, Any]:
    """Prompt ids and image (or ImageBind-LLM inputs) of a conversation (run off the event loop: images and audio
    are decoded and preprocessed here, before the request is queued)."""
    plain, image = _user_error(split_images, engine, messages, policy)
    ids = _user_error(chat_ids, engine, plain)
    _user_error(check_fits, engine, ids.numel())
    return ids, image


def _completion_prompt(engine: Engine, text: str) -> torch.Tensor:
    """A raw prompt's ids after BOS (off the event loop: a long prompt takes a while to tokenise)."""
    ids = torch.tensor(engine.tokenizer.encode(text, bos=True), device=engine.device)
    _user_error(check_fits, engine, ids.numel())
    return ids


def _submit(scheduler: Scheduler, ids: torch.Tensor, decoding: Decoding, seed: Optional[int], image: Any,
            lstrip: bool) -> Job:
    """Queue one generation whose events arrive in `job.events` (an asyncio queue of this event loop)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink(kind: str, value: Any) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    device = scheduler.engine.device
    generator = torch.Generator(device=device).manual_seed(seed if seed is not None else secrets.randbits(63))
    job = Job(ids, decoding, sink, generator, image, lstrip)
    job.events = events  # type: ignore[attr-defined]
    try:
        scheduler.submit(job)
    except Overloaded as err:
        raise ApiError(503, f"the server is busy: {err}; retry shortly", type="server_error",
                       code="server_overloaded", headers={"Retry-After": "1"}) from None
    return job


async def _wait(job: Job, request: Request) -> Any:
    """The whole completion; the generation is cancelled when the client goes away first (checked every
    DISCONNECT_POLL seconds, between the pieces that keep arriving)."""
    done = False
    checked = time.monotonic()
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL)
            except asyncio.TimeoutError:
                kind, value = None, None
            if kind == "done":
                done = True
                return value
            if kind == "error":
                done = True
                raise ApiError(500, value, type="server_error")
            if time.monotonic() - checked >= DISCONNECT_POLL:
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise ApiError(499, "the client closed the request")
    finally:
        if not done:
            job.cancel()


def _stream(job: Job, body: protocol.Sampling, model: str, chat: bool) -> StreamingResponse:
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    answer_id = protocol.new_id("chatcmpl" if chat else "cmpl")

    def chunk(text: str, finish: Optional[str] = None) -> bytes:
        if chat:
            return protocol.sse(protocol.chat_chunk(answer_id, model, {"content": text} if text else {}, finish))
        return protocol.sse(protocol.text_chunk(answer_id, model, text, finish))

    async def events() -> AsyncIterator[bytes]:
        try:
            if chat:
                yield protocol.sse(protocol.chat_chunk(answer_id, model, {"role": "assistant", "content": ""}))
            while True:
                kind, value = await job.events.get()
                if kind == "piece":
                    yield chunk(value)
                    continue
                if kind == "done":
                    yield chunk("", value.finish)
                    if include_usage:
                        name = "chat.completion.chunk" if chat else "text_completion"
                        yield protocol.sse(protocol.usage_chunk(answer_id, model, name, value.prompt_tokens,
                                                                value.new_tokens))
                else:
                    yield protocol.sse(protocol.error_body(value, "server_error"))
                yield protocol.sse("[DONE]")
                return
        finally:
            job.cancel()  # a client gone mid-stream frees its row; after the end this changes nothing

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class ServerThread:
    """uvicorn serving `app` on a background thread (tests, benchmarks): `with ServerThread(app) as server:`
    gives `server.url`; port 0 takes a free port."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, name="lit-adapter-server", daemon=True)
        self.host = host
        self.port = port

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
