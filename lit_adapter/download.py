"""`lit-adapter download`: a known small checkpoint (stories260K, sha256-checked) or a Hugging Face Hub repository
(ORG/NAME), converted into a cached checkpoint folder.

A Hub repository is fetched through `huggingface_hub` into its own cache (resumable; only the safetensors weights,
config and tokenizer files), then converted with `lit-adapter convert`. HF_TOKEN authorises gated and private
repositories; with HF_HUB_OFFLINE=1 the cached snapshot is used and nothing is fetched; HF_HUB_CACHE / HF_HOME place
the Hub cache as huggingface_hub places it.

Environment: LIT_ADAPTER_DOWNLOAD_URL replaces the download location of a known model (a mirror, or a file://
folder); LIT_ADAPTER_CACHE replaces the cache root (~/.cache/lit-adapter); LIT_ADAPTER_ASSETS, when set, holds a
local copy of the known models' files (ASSETS/stories260K/...), used instead of downloading them. A complete
converted folder in the cache is used as it is: nothing touches the network then.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from lit_adapter.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from lit_adapter.errors import LitAdapterError, first_line
from lit_adapter.files import atomic_path, load_yaml, save_yaml, temporary_dir
from lit_adapter.tokenizer import find_tokenizer_file


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
# what a Hub download fetches: the weights as safetensors, the model's config, the tokenizer and its files
HUB_FILES = [
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
    "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
]
ASSETS_ENV = "LIT_ADAPTER_ASSETS"  # a folder holding local copies of the known models' files
SOURCE_FILE = "download.yaml"  # in a converted Hub checkpoint: the repository and commit it was made from


def cache_dir() -> Path:
    return Path(os.environ.get("LIT_ADAPTER_CACHE") or Path.home() / ".cache" / "lit-adapter")


def download(
    name: str = "stories260K", out_dir: Optional[Path] = None, base_url: Optional[str] = None, revision: str = "main"
) -> Path:
    """Download stories260K or a Hugging Face Hub repository and convert it into a checkpoint folder.

    A known small model is sha256-checked; a complete copy already in the cache is used as it is.

    Args:
        name: stories260K, or a Hub repository ORG/NAME (e.g. Qwen/Qwen2.5-0.5B-Instruct; HF_TOKEN for gated ones,
            HF_HUB_OFFLINE=1 to use the local Hugging Face cache only).
        out_dir: the checkpoint folder to write; default: the cache ($LIT_ADAPTER_CACHE or ~/.cache/lit-adapter)/NAME
            (Hub repositories: .../hf/ORG/NAME).
        base_url: where a known model's files are (http(s):// or file://); default: $LIT_ADAPTER_DOWNLOAD_URL, else
            a local copy in $LIT_ADAPTER_ASSETS/NAME, else the model's public location.
        revision: a Hub repository's branch, tag or commit.
    """
    if name not in KNOWN_MODELS and "/" in name:
        return download_hub(name, Path(out_dir) if out_dir is not None else None, revision)
    model = known_model(name)
    out_dir = Path(out_dir) if out_dir is not None else cache_dir() / name
    if is_checkpoint(out_dir):  # complete (folders appear by rename only): nothing to fetch
        print(f"{name} checkpoint folder (already converted): {out_dir}")
        return out_dir
    explicit = base_url or os.environ.get("LIT_ADAPTER_DOWNLOAD_URL")  # a location named: fetch from there
    local = local_assets(name) if not explicit else None
    if local is None:
        advice = (f"run it again with internet, point LIT_ADAPTER_DOWNLOAD_URL or --base_url at a mirror, or set "
                  f"{ASSETS_ENV} to a folder holding {name}/ ({', '.join(model.sha256)})")
        local = fetch_known(name, explicit or model.url, advice)
    folder = convert_once(local / model.weights, local / model.tokenizer, out_dir)
    print(f"{name} checkpoint folder: {folder}")
    return folder



def local_assets(name: str) -> Optional[Path]:
    """$LIT_ADAPTER_ASSETS/NAME when that is set and holds the known model's files (sha256-checked), else None."""
    assets = os.environ.get(ASSETS_ENV)
    if not assets:
        return None
    model = KNOWN_MODELS[name]
    source = Path(assets) / name
    for filename, expected in model.sha256.items():
        check_sha256(source / filename, expected)
    return source


def stories260k_checkpoint() -> Path:
    """The converted stories260K checkpoint folder in the cache: made from $LIT_ADAPTER_ASSETS/stories260K when
    that is set, else downloaded; converted once, then returned at the cost of three stat calls. Offline, without
    either, one line says both ways out."""
    folder = cache_dir() / "stories260K"
    if is_checkpoint(folder):
        return folder
    model = KNOWN_MODELS["stories260K"]
    local = local_assets("stories260K")
    if local is None:
        advice = (f"set {ASSETS_ENV} to a folder holding stories260K/ ({', '.join(model.sha256)}), or run "
                  f"`lit-adapter download stories260K` once with internet (it fills {folder})")
        local = fetch_known("stories260K", os.environ.get("LIT_ADAPTER_DOWNLOAD_URL") or model.url, advice)
    return convert_once(local / model.weights, local / model.tokenizer, folder)


def fetch_known(name: str, base_url: str, advice: str) -> Path:
    """The folder in the cache holding a known model's files, fetched from `base_url` where missing."""
    model = KNOWN_MODELS[name]
    sources = cache_dir() / "downloads" / name
    for filename, sha256 in model.sha256.items():
        fetch(join_url(base_url, filename), sources / filename, sha256, advice)
    return sources


def known_model(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise LitAdapterError(
            f"unknown model {name!r} to download; known: {', '.join(KNOWN_MODELS)}, or a Hugging Face Hub repository "
            "ORG/NAME"
        )
    return KNOWN_MODELS[name]


def join_url(base_url: str, filename: str) -> str:
    return base_url.rstrip("/") + "/" + filename


def is_checkpoint(folder: Path) -> bool:
    files = (CONFIG_FILE, WEIGHTS_FILE)
    return all((folder / name).is_file() for name in files) and find_tokenizer_file(folder) is not None


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


def fetch(url: str, path: Path, sha256: str, advice: str = "point LIT_ADAPTER_DOWNLOAD_URL at a mirror") -> None:
    """Download url to path unless a file with the right sha256 is already there; nothing partial is ever left.
    A failed download names `advice` (what to do instead)."""
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
            raise LitAdapterError(f"{url}: download failed ({reason}); {advice}") from None
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

    def write(tmp: Path) -> None:
        _, config, state_dict = load_source(weights)
        save_checkpoint(tmp, state_dict, config, tokenizer)

    return write_atomically(folder, write)


def write_atomically(folder: Path, write: Callable[[Path], None], replace: bool = False) -> Path:
    """`write` fills a temporary sibling folder, which is then renamed to `folder`; `replace` lets a complete folder
    already there give way (a newer revision)."""
    tmp = temporary_dir(folder)  # the modes the umask gives (mkdtemp's would be private)
    try:
        write(tmp)
        if folder.exists() and (replace or not is_checkpoint(folder)):
            shutil.rmtree(folder)  # an older revision, or a leftover of an interrupted older layout
        try:
            os.rename(tmp, folder)
        except OSError as err:
            if not is_checkpoint(folder):  # not a concurrent conversion that won the race
                raise LitAdapterError(f"{folder}: cannot create the checkpoint folder ({err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def hub_cache() -> Optional[str]:
    """The Hugging Face cache as huggingface_hub places it, read now (the library reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def download_hub(repo_id: str, out_dir: Optional[Path] = None, revision: str = "main") -> Path:
    """Fetch (or, offline, find in the cache) a Hub repository's snapshot and convert it once per commit."""
    folder = out_dir or cache_dir() / "hf" / repo_id
    snapshot = fetch_snapshot(repo_id, revision)
    source = {"repo_id": repo_id, "commit": snapshot.name}
    if is_checkpoint(folder) and (folder / SOURCE_FILE).is_file() and load_yaml(folder / SOURCE_FILE) == source:
        print(f"{repo_id} checkpoint folder (already converted): {folder}")
        return folder
    if not (snapshot / "config.json").is_file() or not any(snapshot.glob("*.safetensors")):
        raise LitAdapterError(
            f"{repo_id}: the snapshot {snapshot} has no config.json and safetensors weights (only safetensors are "
            "downloaded); convert a local copy with `lit-adapter convert FOLDER`"
        )
    from lit_adapter.convert import convert

    def write(tmp: Path) -> None:
        convert(snapshot, tmp)
        save_yaml(source, tmp / SOURCE_FILE)

    write_atomically(folder, write, replace=True)
    print(f"{repo_id} checkpoint folder: {folder}")
    return folder


def fetch_snapshot(repo_id: str, revision: str) -> Path:
    """The snapshot folder of `repo_id` at `revision` in the Hugging Face cache (downloaded unless offline)."""
    try:
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LitAdapterError("downloading from the Hub needs huggingface_hub: pip install huggingface_hub") from None
    offline = hub_offline()
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES, cache_dir=hub_cache(),
                                 local_files_only=offline)
    except hub_errors.GatedRepoError:
        raise LitAdapterError(f"{repo_id}: a gated repository; accept its licence on huggingface.co and set HF_TOKEN "
                              "to a token of that account") from None
    except hub_errors.RevisionNotFoundError:
        raise LitAdapterError(f"{repo_id}: revision {revision!r} not found") from None
    except hub_errors.RepositoryNotFoundError:
        raise LitAdapterError(f"{repo_id}: repository not found on the Hub (a private one needs HF_TOKEN)") from None
    except hub_errors.LocalEntryNotFoundError as err:
        where = hub_cache() or "the Hugging Face cache"
        if offline:
            raise LitAdapterError(f"{repo_id}: revision {revision!r} is not in {where} and HF_HUB_OFFLINE=1 forbids "
                                  "downloading; download it once online or unset HF_HUB_OFFLINE") from None
        raise LitAdapterError(f"{repo_id}: cannot reach the Hub and not in {where} ({first_line(err)})") from None
    except (hub_errors.HfHubHTTPError, hub_errors.HFValidationError, OSError) as err:
        raise LitAdapterError(f"{repo_id}: download failed ({first_line(err)}); run again to resume") from None
    return Path(path)
