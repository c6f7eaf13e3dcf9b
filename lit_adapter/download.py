"""Fetch a known small checkpoint (stories260K), check its sha256 and convert it into a cached checkpoint folder.

Environment: LIT_ADAPTER_DOWNLOAD_URL replaces the download location (a mirror, or a file:// folder);
LIT_ADAPTER_CACHE replaces the cache root (~/.cache/lit-adapter); LIT_ADAPTER_ASSETS, when set, lets
`stories260k_checkpoint` use a local copy of the files instead of downloading them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lit_adapter.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from lit_adapter.errors import LitAdapterError
from lit_adapter.files import atomic_path


@dataclass(frozen=True)
class KnownModel:
    url: str
    weights: str  # the file `lit-adapter convert` reads
    tokenizer: str
    sha256: dict[str, str]


KNOWN_MODELS = {
    "stories260K": KnownModel(
        url="https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/",
        weights="stories260K.bin",
        tokenizer="tok512.model",
        sha256={
            "stories260K.bin": "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
            "tok512.model": "fec6aa960a1fb3ebf71d26f9b0e486afcbd76c34cf0fbfb93e21126ca9f778d3",
        },
    ),
}
CHUNK = 1 << 16


def cache_dir() -> Path:
    return Path(os.environ.get("LIT_ADAPTER_CACHE") or Path.home() / ".cache" / "lit-adapter")


def download(name: str = "stories260K", out_dir: Optional[Path] = None, base_url: Optional[str] = None) -> Path:
    """Download a known small model, check its sha256 and convert it into a checkpoint folder.

    Args:
        name: the model to fetch; known: stories260K.
        out_dir: the checkpoint folder to write; default: the cache ($LIT_ADAPTER_CACHE or ~/.cache/lit-adapter)/NAME.
        base_url: where the files are (http(s):// or file://); default: $LIT_ADAPTER_DOWNLOAD_URL, else the
            model's public location.
    """
    model = known_model(name)
    out_dir = Path(out_dir) if out_dir is not None else cache_dir() / name
    base_url = base_url or os.environ.get("LIT_ADAPTER_DOWNLOAD_URL") or model.url
    sources = cache_dir() / "downloads" / name
    for filename in model.sha256:
        fetch(join_url(base_url, filename), sources / filename, model.sha256[filename])
    folder = convert_once(sources / model.weights, sources / model.tokenizer, out_dir)
    print(f"{name} checkpoint folder: {folder}")
    return folder


def stories260k_checkpoint() -> Path:
    """The converted stories260K checkpoint folder in the cache: made from $LIT_ADAPTER_ASSETS/stories260K when
    that is set, else downloaded; converted once, then returned at the cost of three stat calls."""
    folder = cache_dir() / "stories260K"
    if is_checkpoint(folder):
        return folder
    assets = os.environ.get("LIT_ADAPTER_ASSETS")
    if not assets:
        return download("stories260K", out_dir=folder)
    model = KNOWN_MODELS["stories260K"]
    source = Path(assets) / "stories260K"
    for filename, expected in model.sha256.items():
        check_sha256(source / filename, expected)
    return convert_once(source / model.weights, source / model.tokenizer, folder)


def known_model(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise LitAdapterError(f"unknown model {name!r} to download; known: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


def join_url(base_url: str, filename: str) -> str:
    return base_url.rstrip("/") + "/" + filename


def is_checkpoint(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    if not path.is_file():
        raise LitAdapterError(f"{path}: file not found")
    got = sha256_of(path)
    if got != expected:
        raise LitAdapterError(f"{path}: sha256 {got} does not match the expected {expected}")


def fetch(url: str, path: Path, sha256: str) -> None:
    """Download url to path unless a file with the right sha256 is already there; nothing partial is ever left."""
    if path.is_file() and sha256_of(path) == sha256:
        return
    from tqdm import tqdm

    digest = hashlib.sha256()
    with atomic_path(path) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, disable=None) as bar:
                    for block in iter(lambda: response.read(CHUNK), b""):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", None) or err
            raise LitAdapterError(
                f"{url}: download failed ({reason}); point LIT_ADAPTER_DOWNLOAD_URL or --base_url at a mirror"
            ) from None
        if digest.hexdigest() != sha256:
            raise LitAdapterError(
                f"{url}: sha256 {digest.hexdigest()} does not match the expected {sha256}; the file was not kept"
            )


def convert_once(weights: Path, tokenizer: Path, folder: Path) -> Path:
    """Convert into a temporary sibling folder, then rename it into place: a reader (or a concurrent converter)
    sees either no folder or a complete one."""
    from lit_adapter.checkpoint import save_checkpoint
    from lit_adapter.convert import load_source

    if is_checkpoint(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _, config, state_dict = load_source(weights)
        save_checkpoint(tmp, state_dict, config, tokenizer)
        if folder.exists() and not is_checkpoint(folder):
            shutil.rmtree(folder)  # a leftover of an interrupted older layout
        try:
            os.rename(tmp, folder)
        except OSError as err:
            if not is_checkpoint(folder):  # not a concurrent conversion that won the race
                raise LitAdapterError(f"{folder}: cannot create the checkpoint folder ({err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
