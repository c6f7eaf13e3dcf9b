"""Images in chat messages: `image_url` parts as data URLs (always), local paths or http(s) URLs (each only when
the server was started with its flag), decoded and checked before a request is queued; encoded on the decoding
thread into the adapter's visual tokens, exactly as `Engine.visual_tokens` encodes an image file (an ImageBind-LLM
adapter's inputs, images and audio: `serving.media`)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlparse

from lit_adapter.errors import LitAdapterError, first_line
from lit_adapter.serving.media import BindInputs, bind_tokens, check_encoder

MAX_DOWNLOAD_BYTES = 20 * 2**20  # an http image larger than this is refused
DOWNLOAD_TIMEOUT = 10.0


@dataclass(frozen=True)
class ImagePolicy:
    """Which image sources the server reads besides data URLs."""

    allow_paths: bool = False
    allow_urls: bool = False


def image_bytes(url: Any, policy: ImagePolicy, where: str) -> bytes:
    """The bytes an `image_url.url` names; `where` (e.g. "messages[1].content[0]") starts every error."""
    if not isinstance(url, str) or not url:
        raise LitAdapterError(f"{where}.image_url.url must be a non-empty string (a data:image/...;base64 URL)")
    if url.startswith("data:"):
        return _data_url(url, where)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        if not policy.allow_urls:
            raise LitAdapterError(f"{where}: http(s) image URLs are off; send the image as a data URL, or start the "
                                  "server with --allow_image_urls")
        return _download(url, where)
    if scheme in ("", "file") or len(scheme) == 1:  # a path (a Windows drive letter parses as a scheme)
        if not policy.allow_paths:
            raise LitAdapterError(f"{where}: local image paths are off; send the image as a data URL, or start the "
                                  "server with --allow_image_paths")
        path = Path(unquote(urlparse(url).path) if scheme == "file" else url).expanduser()
        if not path.is_file():
            raise LitAdapterError(f"{where}: image not found: {path}")
        return path.read_bytes()
    raise LitAdapterError(f"{where}: unsupported image URL scheme {scheme!r}; send a data:image/...;base64 URL")


def _data_url(url: str, where: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise LitAdapterError(f"{where}: a data URL must look like data:image/png;base64,<base64 bytes>")
    mime = header[len("data:"): -len(";base64")].split(";")[0].strip().lower()
    if mime and not mime.startswith("image/"):
        raise LitAdapterError(f"{where}: the data URL holds {mime!r}, not an image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise LitAdapterError(f"{where}: the data URL's base64 payload is not valid base64") from None


def _download(url: str, where: str) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:  # noqa: S310 (http(s) only)
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except Exception as err:  # urllib raises many kinds (URLError, HTTPError, timeouts, ValueError)
        raise LitAdapterError(f"{where}: cannot fetch the image {url} ({first_line(err)})") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise LitAdapterError(f"{where}: the image at {url} is larger than {MAX_DOWNLOAD_BYTES // 2**20} MiB")
    return data


def decode_image(data: bytes, where: str):
    """The image as RGB, fully decoded (a damaged file fails here, before the request is queued), by the decoder
    of image files (`lit_adapter.images`)."""
    from lit_adapter.images import decode_rgb

    return decode_rgb(data, f"{where}: cannot read the image", "send a PNG, JPEG or other common image")


def check_takes_images(engine: Any, where: str) -> str:
    """The way the engine's model sees an image part: "clip" (a CLIP visual adapter) or "bind" (ImageBind-LLM, its
    encoder attached); else the part is refused."""
    if not engine.multimodal:
        raise LitAdapterError(f"{where}: this model has no visual encoder, so it takes no images; send text only or "
                              "serve a multimodal adapter")
    if engine.binds:
        check_encoder(engine, where)
        return "bind"
    return "clip"


def visual_tokens(engine: Any, image: Any) -> Optional[Any]:
    """The adapter's visual tokens [1, tokens, dim] for one decoded image (as `Engine.visual_tokens` computes them
    for a file), or for an ImageBind-LLM conversation's inputs (`serving.media.BindInputs`)."""
    import torch

    if isinstance(image, BindInputs):
        return bind_tokens(engine, image)
    transform = engine.adapter_model.visual.config.transform(train=False)
    with torch.inference_mode():
        pixels = transform(image)[None].to(device=engine.device, dtype=engine.dtype)
        return engine.adapter_model.encode_images(pixels)
