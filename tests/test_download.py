"""`lit-adapter download`: a file:// stand-in for the public location, sha256 checks, atomic writes, the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_adapter.checkpoint import WEIGHTS_FILE
from lit_adapter.download import download, stories260k_checkpoint
from lit_adapter.errors import LitAdapterError
from tests.helpers import assert_cli_error, run_cli

FILES = ("stories260K.bin", "tok512.model")


@pytest.fixture
def mirror(assets: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "mirror"
    folder.mkdir()
    for name in FILES:
        shutil.copyfile(assets / "stories260K" / name, folder / name)
    return folder


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LIT_ADAPTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LIT_ADAPTER_DOWNLOAD_URL", raising=False)
    return tmp_path / "cache"


def assert_same_weights(folder: Path, reference: Path) -> None:
    got, expected = load_file(folder / WEIGHTS_FILE), load_file(reference / WEIGHTS_FILE)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_download_converts_into_the_cache(mirror: Path, cache: Path, stories260k_dir: Path) -> None:
    folder = download(base_url=mirror.as_uri())
    assert folder == cache / "stories260K"
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "model_config.yaml", "tokenizer.model"]
    assert_same_weights(folder, stories260k_dir)
    assert sorted(p.name for p in (cache / "downloads" / "stories260K").iterdir()) == sorted(FILES)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temporary folder left

    shutil.rmtree(mirror)  # cached: nothing is fetched again
    assert download(base_url=mirror.as_uri()) == folder


def test_download_url_from_the_environment(mirror: Path, cache: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LIT_ADAPTER_DOWNLOAD_URL", mirror.as_uri() + "/")
    folder = download(out_dir=tmp_path / "elsewhere")
    assert folder == tmp_path / "elsewhere" and (folder / WEIGHTS_FILE).is_file()


def test_wrong_checksum_is_one_line_and_leaves_nothing(mirror: Path, tmp_path: Path) -> None:
    data = bytearray((mirror / "stories260K.bin").read_bytes())
    data[5000] ^= 0xFF
    (mirror / "stories260K.bin").write_bytes(bytes(data))
    cache = tmp_path / "cache"
    result = run_cli("download", "--base_url", mirror.as_uri(), env={"LIT_ADAPTER_CACHE": str(cache)})
    assert_cli_error(result, f"{mirror.as_uri()}/stories260K.bin", "sha256", "does not match")
    downloads = cache / "downloads" / "stories260K"
    assert [p.name for p in downloads.iterdir()] == []  # neither the bad file nor a temporary one
    assert not (cache / "stories260K").exists()


def test_unreachable_source_and_unknown_name(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(LitAdapterError, match=r"stories260K.bin: download failed .*LIT_ADAPTER_DOWNLOAD_URL"):
        download(base_url=(tmp_path / "nowhere").as_uri())
    with pytest.raises(LitAdapterError, match="unknown model 'llama-7b' to download; known: stories260K"):
        download("llama-7b")


def test_stories260k_checkpoint_from_local_assets(assets: Path, cache: Path, stories260k_dir, monkeypatch) -> None:
    monkeypatch.setenv("LIT_ADAPTER_ASSETS", str(assets))
    folder = stories260k_checkpoint()
    assert folder == cache / "stories260K"
    assert_same_weights(folder, stories260k_dir)
    stamp = (folder / WEIGHTS_FILE).stat().st_mtime_ns
    monkeypatch.setenv("LIT_ADAPTER_ASSETS", str(assets / "gone"))  # the second call must not even look
    assert stories260k_checkpoint() == folder
    assert (folder / WEIGHTS_FILE).stat().st_mtime_ns == stamp


def test_stories260k_checkpoint_checks_local_assets(mirror: Path, cache: Path, monkeypatch) -> None:
    (mirror / "tok512.model").write_bytes(b"tampered")
    local = mirror.parent / "assets"
    (local / "stories260K").mkdir(parents=True)
    for name in FILES:
        shutil.copyfile(mirror / name, local / "stories260K" / name)
    monkeypatch.setenv("LIT_ADAPTER_ASSETS", str(local))
    with pytest.raises(LitAdapterError, match=r"tok512.model: sha256 .* does not match"):
        stories260k_checkpoint()
    assert not (cache / "stories260K").exists()
