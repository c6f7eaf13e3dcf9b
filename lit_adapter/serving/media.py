"""ImageBind-LLM inputs in chat messages: `image_url` parts and OpenAI `input_audio` parts.

Each input is preprocessed before the request is queued exactly as `lit-adapter generate --image/--audio` preprocesses
a file: its bytes go to a private temporary file with the input's suffix (the audio decoder and the image/video
choice go by the file), which `lit_adapter.media.inputs.read_inputs` reads, and which is removed at once. All the
inputs of a conversation are mixed with equal weights, as `generate` mixes inputs given without weights; the mixing
itself is the adapter's (`encode_images`: `encoders.joint.mix`), run on the decoding thread.
"""

from __future__ import annotations

import base64
import binascii
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlparse

from lit_adapter.errors import LitAdapterError

AUDIO_FORMATS = ("wav", "mp3", "flac")
AUDIO_PART = "{'type': 'input_audio', 'input_audio': {'data': <base64>, 'format': 'wav'}}"


@dataclass(eq=False)
class BindInputs:
    """The preprocessed inputs of one conversation, [(kind, modality, tensor [1, ...] on the CPU, weight)], as
    `read_inputs` gives them for `generate`'s flags (weight 1: no weight given)."""

    inputs: list[tuple[str, str, Any, float]] = field(default_factory=list)

    def add(self, kind: str, data: bytes, suffix: str, where: str) -> None:
        self.inputs.append((kind, *read_input(kind, data, suffix, where)))

    def weighted(self, device: Any) -> list[tuple[str, Any, float]]:
        """[(modality, batch of one on `device`, weight)] in the order `generate` reads its flags
        (`media.INPUT_KINDS`; inputs of one kind in the conversation's order)."""
        from lit_adapter.media import INPUT_KINDS

        ordered = sorted(self.inputs, key=lambda item: INPUT_KINDS.index(item[0]))
        return [(modality, tensor.to(device), weight) for _, modality, tensor, weight in ordered]


def check_encoder(engine: Any, where: str) -> None:
    """Fail unless the ImageBind-LLM adapter has its ImageBind encoder (`serve --encoder_weights`)."""
    if engine.adapter_model.visual.clip is None:
        raise LitAdapterError(f"{where}: this ImageBind-LLM adapter is served without its ImageBind encoder; restart "
                              "the server with --encoder_weights imagebind_w3D.pth")


def audio_bytes(part: dict, where: str) -> tuple[bytes, str]:
    """The decoded bytes and file suffix (".wav", ...) of an `input_audio` part."""
    audio = part.get("input_audio")
    if not isinstance(audio, dict):
        raise LitAdapterError(f"{where}.input_audio must be an object: {AUDIO_PART}")
    kind = audio.get("format")
    if kind not in AUDIO_FORMATS:
        raise LitAdapterError(f"{where}.input_audio.format: {kind!r} is not one of {list(AUDIO_FORMATS)}")
    data = audio.get("data")
    if not isinstance(data, str) or not data:
        raise LitAdapterError(f"{where}.input_audio.data must be a non-empty base64 string")
    try:
        return base64.b64decode(data, validate=True), f".{kind}"
    except (binascii.Error, ValueError):
        raise LitAdapterError(f"{where}.input_audio.data is not valid base64") from None


def image_suffix(url: str) -> str:
    """The file suffix an image URL's bytes are read under: the path's own (a video file path or URL is read as a
    video, as `generate --image` reads one), the data URL's subtype (`data:image/png` -> ".png")."""
    if url.startswith("data:"):
        subtype = url[len("data:"):].partition(",")[0].split(";")[0].partition("/")[2]
    else:
        parsed = urlparse(url)
        subtype = Path(unquote(parsed.path) if parsed.scheme.lower() in ("http", "https", "file") else url).suffix[1:]
    subtype = subtype.strip().lower()
    return f".{subtype}" if re.fullmatch(r"[a-z0-9]{1,10}", subtype) else ".img"


def read_input(kind: str, data: bytes, suffix: str, where: str) -> tuple[str, Any, float]:
    """(modality, tensor [1, ...], weight) of one input, read as `generate --<kind> FILE` reads FILE; an error names
    `where` instead of the temporary file."""
    import torch

    from lit_adapter.media.inputs import WeightedInput, read_inputs

    with tempfile.TemporaryDirectory(prefix="lit-adapter-serve-") as folder:  # mkdtemp: only we may read it
        path = Path(folder) / f"input{suffix}"
        path.write_bytes(data)
        try:
            [read] = read_inputs([WeightedInput(kind, path)], torch.device("cpu"))
        except LitAdapterError as err:
            raise LitAdapterError(_naming(str(err), path, where)) from None
    return read


def _naming(message: str, path: Path, where: str) -> str:
    """An error about the temporary file as one about the message part."""
    if message.startswith(f"{path}: "):
        message = f"{where}: {message[len(str(path)) + 2:]}"
    return message.replace(str(path), path.name)


def bind_tokens(engine: Any, inputs: BindInputs) -> Optional[Any]:
    """ImageBind-LLM's visual token [1, 1, dim] for a conversation's inputs (as `generate`'s `bind_tokens`)."""
    import torch

    if not inputs.inputs:
        return None
    with torch.inference_mode():
        return engine.adapter_model.encode_images(inputs.weighted(engine.device))
