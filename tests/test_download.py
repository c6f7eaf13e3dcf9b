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
    result = run_cli("download", "--base_url", mirror.as_uri(), env={"LIT_ADAPTER_CACHE": str(cache)}, fresh=True)
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


# ---- Hugging Face Hub repositories (offline: a pre-populated huggingface_hub cache) ----

HUB_REPO = "tiny-org/tiny-llama-chat"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_cache_with_repo(cache: Path, source: Path, repo_id: str = HUB_REPO, commit: str = COMMIT) -> Path:
    """huggingface_hub's cache layout, as a download leaves it: blobs named by content hash, the snapshot's files as
    relative symlinks to them, refs/main naming the commit."""
    import hashlib
    import os

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub_model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random LlamaForCausalLM saved by transformers (safetensors) with a Llama-3-style tokenizer.json, its
    tokenizer_config.json (chat template) and generation_config.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.chat_templates import LLAMA3
    from tests.hf_tokenizer import CORPUS, save_tokenizer_folder, train_byte_level_bpe

    folder = tmp_path_factory.mktemp("hub-source")
    hf = train_byte_level_bpe(CORPUS, LLAMA3.specials, bos="<|begin_of_text|>")
    stops = [hf.token_to_id("<|eot_id|>"), hf.token_to_id("<|end_of_text|>")]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=hf.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=stops[1],
        eos_token_id=stops,
    )).eval()
    model.save_pretrained(str(folder))
    save_tokenizer_folder(folder, hf, bos="<|begin_of_text|>", eos="<|eot_id|>", chat_template=LLAMA3.source,
                          eos_token_ids=stops)
    return folder, model


def test_download_from_a_prepopulated_hub_cache_offline(hub_model, tmp_path: Path, monkeypatch, capsys) -> None:
    from huggingface_hub import scan_cache_dir

    source, hf_model = hub_model
    hub = tmp_path / "hub"
    hf_cache_with_repo(hub, source)
    scan = scan_cache_dir(hub)  # huggingface_hub itself reads the cache we built
    assert [r.repo_id for r in scan.repos] == [HUB_REPO] and not scan.warnings
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "LIT_ADAPTER_CACHE": str(tmp_path / "lit")}

    result = run_cli("download", HUB_REPO, env=env, timeout=300, fresh=True)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "lit" / "hf" / "tiny-org" / "tiny-llama-chat"
    assert f"{HUB_REPO} checkpoint folder: {folder}" in result.stdout
    assert sorted(p.name for p in folder.iterdir()) == [
        "download.yaml", "generation_config.json", "model.safetensors", "model_config.yaml", "tokenizer.json",
        "tokenizer_config.json"]  # fmt: skip

    from lit_adapter.checkpoint import load_model
    from lit_adapter.tokenizer import Tokenizer

    tokenizer = Tokenizer(folder)
    ids = tokenizer.encode("Once upon a time 你好")
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits
        got = load_model(folder)(torch.tensor([ids]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert set(tokenizer.stop_ids) == {tokenizer.token_id("<|eot_id|>"), tokenizer.token_id("<|end_of_text|>")}
    assert tokenizer.chat_template is not None

    stamp = (folder / WEIGHTS_FILE).stat().st_mtime_ns
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert download(HUB_REPO) == folder  # the same commit: not converted again
    assert "already converted" in capsys.readouterr().out
    assert (folder / WEIGHTS_FILE).stat().st_mtime_ns == stamp


def test_offline_download_of_an_uncached_repo_is_one_line(tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "LIT_ADAPTER_CACHE": str(tmp_path / "lit")}
    result = run_cli("download", "nobody/nothing", env=env, fresh=True)
    assert_cli_error(result, "nobody/nothing", "HF_HUB_OFFLINE=1", "not in")
    assert not (tmp_path / "lit" / "hf").exists()


def test_a_snapshot_without_safetensors_is_refused(hub_model, tmp_path: Path, monkeypatch) -> None:
    source, _ = hub_model
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(source / name, partial / name)
    hf_cache_with_repo(tmp_path / "hub", partial)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(LitAdapterError, match=f"{HUB_REPO}: the snapshot .* has no config.json and safetensors"):
        download(HUB_REPO)


# ---- offline: no LIT_ADAPTER_ASSETS, no network ----

@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """This process cannot reach the network: every attempt is recorded and fails."""
    import socket
    import urllib.request

    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:1]))
        raise OSError("network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.delenv("LIT_ADAPTER_ASSETS", raising=False)
    monkeypatch.delenv("LIT_ADAPTER_DOWNLOAD_URL", raising=False)
    return attempts


def test_offline_with_an_empty_cache_fit_and_download_say_both_ways_out(cache: Path, no_network, tmp_path: Path,
                                                                      capsys, monkeypatch) -> None:
    from tests.helpers import REPO_ROOT, run_main

    code, _, err = run_main(["fit", "--config", str(REPO_ROOT / "configs" / "demo.yaml"),
                             "--trainer.default_root_dir", str(tmp_path / "run")], capsys, monkeypatch)
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # Lightning's info lines aside
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    for fragment in ("stories260K.bin: download failed", "network is unreachable", "set LIT_ADAPTER_ASSETS",
                     "`lit-adapter download stories260K` once with internet"):
        assert fragment in errors[0], (fragment, err)
    assert "--base_url" not in errors[0]  # fit has no such option
    code, _, err = run_main(["download", "stories260K"], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "again with internet" in err and "set LIT_ADAPTER_ASSETS" in err
    assert not (cache / "stories260K").exists() and len(no_network) == 2  # one attempt each, nothing else


def test_offline_with_a_complete_cache_nothing_touches_the_network(stories260k_dir: Path, cache: Path, no_network,
                                                                   capsys, monkeypatch) -> None:
    from lit_adapter.training.build import resolve_checkpoint_dir
    from tests.helpers import run_main

    shutil.copytree(stories260k_dir, cache / "stories260K")
    assert resolve_checkpoint_dir("stories260K") == cache / "stories260K"  # what `fit` does with the name
    assert stories260k_checkpoint() == cache / "stories260K"
    code, out, err = run_main(["download", "stories260K"], capsys, monkeypatch)
    assert code == 0, err
    assert out.strip() == f"stories260K checkpoint folder (already converted): {cache / 'stories260K'}"
    assert no_network == []


def test_offline_downloaded_files_in_the_cache_are_converted_without_the_network(
        mirror: Path, cache: Path, stories260k_dir: Path, no_network) -> None:
    sources = cache / "downloads" / "stories260K"
    sources.mkdir(parents=True)
    for name in FILES:
        shutil.copyfile(mirror / name, sources / name)
    folder = download("stories260K")
    assert_same_weights(folder, stories260k_dir)
    assert no_network == []


def test_download_uses_the_assets_copy_when_no_location_is_named(assets: Path, cache: Path, stories260k_dir: Path,
                                                                  no_network, monkeypatch) -> None:
    monkeypatch.setenv("LIT_ADAPTER_ASSETS", str(assets))
    assert_same_weights(download("stories260K"), stories260k_dir)
    assert no_network == [] and not (cache / "downloads").exists()
