"""`lit-adapter serve`: the OpenAI-compatible server and its chat page (the heavy imports wait until it starts)."""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

if TYPE_CHECKING:
    from lit_adapter.encoders.joint import CacheSettings

API_KEY_ENV = "LIT_ADAPTER_API_KEY"
BOOLEAN_FLAGS = ("--no_merge", "--allow_image_paths", "--allow_image_urls")


def serve(
    checkpoint_dir: Path,
    adapter: Optional[Path] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    model_name: Optional[str] = None,
    prompt_style: Optional[str] = None,
    max_batch_size: int = 16,
    max_queue: int = 64,
    max_new_tokens: int = 256,
    max_body_mb: float = 16.0,
    allow_image_paths: bool = False,
    allow_image_urls: bool = False,
    encoder_weights: Optional[Path] = None,
    cache_index: Optional[Path] = None,
    cache_size: int = 10,
    cache_t: float = 20.0,
    cache_weight: float = 0.5,
    no_merge: bool = False,
    precision: Literal["auto", "32-true", "bf16-true", "16-true"] = "auto",
    device: str = "auto",
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info",
) -> None:
    """Serve a model (and adapter) over the OpenAI API, with a browser chat at `/`.

    Endpoints: POST /v1/chat/completions (text and image_url parts; with an ImageBind-LLM adapter also input_audio
    parts), POST /v1/completions, GET /v1/models, GET /health. Requests arriving together are decoded in one batch
    (continuous batching).

    Args:
        checkpoint_dir: a folder written by `lit-adapter convert`.
        adapter: an adapter (our `adapter.safetensors` or its folder, or an official V1/V2 `.pth`).
        host: the address to listen on; 127.0.0.1 (this machine only) unless you mean to expose it.
        port: the TCP port.
        api_key: require `Authorization: Bearer <key>` on /v1 (default: the LIT_ADAPTER_API_KEY variable; unset:
            no key).
        model_name: the model's id in the API (default: the checkpoint folder's name, + the adapter's).
        prompt_style: how chat messages are rendered: chat, chat_template (the checkpoint's own), alpaca or alpaca_zh
            (in their multi-turn form, as `lit-adapter chat` renders them) or raw (one user message); default: the
            adapter's own (a single-turn one in its multi-turn form), else the checkpoint's chat template, else chat.
        max_batch_size: the most sequences decoded together.
        max_queue: the most requests waiting for a place in the batch; more are answered 503.
        max_new_tokens: the answer length when a request gives no max_tokens.
        max_body_mb: the largest request body (images included), in MiB; larger ones are answered 413.
        allow_image_paths: also read image_url parts that are local file paths (file://...).
        allow_image_urls: also fetch image_url parts that are http(s) URLs.
        encoder_weights: (ImageBind-LLM) the ImageBind weights (imagebind_w3D.pth) the adapter's encoder loads;
            without them such an adapter answers text only.
        cache_index: (ImageBind-LLM) embeddings to retrieve from: a .safetensors [N, 1024] matrix or a faiss index.
        cache_size: retrieval: how many neighbours.
        cache_t: retrieval: the softmax temperature over their scores.
        cache_weight: retrieval: the share of the retrieved embedding in the result.
        no_merge: keep bias/scale and LoRA as separate modules instead of folding them into the weights.
        precision: 32-true, bf16-true or 16-true; auto = bf16-true on a GPU that supports it, else 32-true.
        device: cpu, cuda, cuda:1, ... or auto.
        log_level: uvicorn's log level.
    """
    from lit_adapter.encoders.joint import CacheSettings
    from lit_adapter.errors import LitAdapterError

    check_options(host, port, max_batch_size, max_queue, max_new_tokens, max_body_mb)
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise LitAdapterError(f"--api_key: empty; give a key, or unset it and {API_KEY_ENV} to serve without one")
    app = build_app(checkpoint_dir, adapter, api_key=api_key, model_name=model_name, prompt_style=prompt_style,
                    max_batch_size=max_batch_size, max_queue=max_queue, max_new_tokens=max_new_tokens,
                    max_body_mb=max_body_mb, allow_image_paths=allow_image_paths,
                    allow_image_urls=allow_image_urls, encoder_weights=encoder_weights, cache_index=cache_index,
                    cache=CacheSettings(cache_size, cache_t, cache_weight), merge=not no_merge,
                    precision=precision, device=device)
    settings = app.state.settings
    if app.state.engine.binds and app.state.engine.adapter_model.visual.clip is None:
        print("warning: an ImageBind-LLM adapter without its ImageBind encoder: image and audio parts are answered "
              "400 (start the server with --encoder_weights imagebind_w3D.pth)", file=sys.stderr)
    if not _is_loopback(host) and api_key is None:
        print(f"warning: serving on {host} without an API key: anyone who can reach it can use the model "
              f"(set --api_key or {API_KEY_ENV})", file=sys.stderr)
    print(f"serving {settings.model_name!r} on http://{host}:{port} (chat page: /, API: /v1)", file=sys.stderr)
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


def build_app(checkpoint_dir: Path, adapter: Optional[Path] = None, *, api_key: Optional[str] = None,
              model_name: Optional[str] = None, prompt_style: Optional[str] = None, max_batch_size: int = 16,
              max_queue: int = 64, max_new_tokens: int = 256, max_body_mb: float = 16.0,
              allow_image_paths: bool = False, allow_image_urls: bool = False,
              encoder_weights: Optional[Path] = None, cache_index: Optional[Path] = None,
              cache: Optional[CacheSettings] = None, merge: bool = True, precision: str = "auto",
              device: str = "auto"):
    """The FastAPI app serving a checkpoint (+ adapter), as `serve` runs it (tests start it on a thread); an
    ImageBind-LLM adapter gets its encoder and retrieval cache as `generate` attaches them (`prepare_bind`; for any
    other model these options are refused in one line)."""
    from lit_adapter.inference.cli import prepare_bind
    from lit_adapter.inference.engine import ADAPTER_DECODING, BASE_DECODING
    from lit_adapter.serving.app import ServerSettings, create_app
    from lit_adapter.serving.images import ImagePolicy

    engine = load_engine(checkpoint_dir, adapter, prompt_style, device, precision, merge)
    prepare_bind(engine, {}, Path(encoder_weights) if encoder_weights is not None else None,
                 Path(cache_index) if cache_index is not None else None, cache)
    settings = ServerSettings(
        model_name=model_name or default_model_name(Path(checkpoint_dir), adapter), api_key=api_key,
        max_batch_size=max_batch_size, max_queue=max_queue, max_new_tokens=max_new_tokens,
        max_body_bytes=int(max_body_mb * 2**20), images=ImagePolicy(allow_image_paths, allow_image_urls),
        completion_defaults=ADAPTER_DECODING if adapter is not None else BASE_DECODING,
    )
    return create_app(engine, settings)


def load_engine(checkpoint_dir: Path, adapter: Optional[Path], prompt_style: Optional[str], device: str = "auto",
                precision: str = "auto", merge: bool = True):
    """The engine, its style the one conversations take (as `generate --messages` and `chat` choose it): a chosen
    single-turn style (alpaca, ...) in its multi-turn form, with that form's stop sequences; one without such a form
    (raw) stays single-turn and takes one user message."""
    from lit_adapter.errors import LitAdapterError
    from lit_adapter.inference.chat import conversation_style
    from lit_adapter.inference.engine import Engine
    from lit_adapter.prompts import multi_turn_form

    engine = Engine.load(Path(checkpoint_dir), Path(adapter) if adapter is not None else None, device, precision,
                         merge=merge, prompt_style=prompt_style)
    if prompt_style is None:
        engine.style = conversation_style(engine)
    elif not engine.style.multi_turn:
        try:
            engine.style = multi_turn_form(engine.style)
        except LitAdapterError:
            pass  # raw: a conversation of one user message, rendered as its single-turn prompt (`chat_ids`)
    return engine


def default_model_name(checkpoint_dir: Path, adapter: Optional[Path]) -> str:
    name = checkpoint_dir.resolve().name
    if adapter is None:
        return name
    adapter = Path(adapter).resolve()
    return f"{name}+{adapter.parent.name if adapter.is_file() and adapter.suffix == '.safetensors' else adapter.stem}"


def check_options(host: str, port: int, max_batch_size: int, max_queue: int, max_new_tokens: int,
                  max_body_mb: float) -> None:
    """Refuse meaningless limits before the model loads."""
    from lit_adapter.errors import LitAdapterError

    checks = [
        (0 <= port <= 65535, f"--port {port}: must be in 0..65535"),
        (max_batch_size >= 1, f"--max_batch_size {max_batch_size}: must be at least 1"),
        (max_queue >= 0, f"--max_queue {max_queue}: must be at least 0"),
        (max_new_tokens >= 1, f"--max_new_tokens {max_new_tokens}: must be at least 1"),
        (max_body_mb > 0, f"--max_body_mb {max_body_mb}: must be positive"),
        (bool(host.strip()), "--host: empty; use 127.0.0.1 (this machine) or 0.0.0.0 (every interface)"),
    ]
    for ok, message in checks:
        if not ok:
            raise LitAdapterError(message)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """Let the boolean flags stand alone (`--allow_image_urls` means true)."""
    out: list[str] = []
    args = list(argv)
    for i, arg in enumerate(args):
        out.append(arg)
        if arg in BOOLEAN_FLAGS and (i + 1 >= len(args) or args[i + 1].lower() not in ("true", "false")):
            out.append("true")
    return out


def serve_main(argv: Sequence[str]) -> None:
    from lit_adapter.arguments import run_function_cli

    run_function_cli(serve, normalize_argv(argv), "lit-adapter serve")

