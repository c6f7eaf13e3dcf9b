"""Bad inputs through the real CLI: exit status 2, one line on stderr naming the file and the problem, no traceback.

Each case prepares its inputs and returns (argv, fragments the error line must contain). The CLI processes are
started together (a few at a time), since most of their time is the interpreter and torch starting up.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from lit_adapter.config import ModelConfig
from lit_adapter.convert.hf import hf_config_dict, to_hf_state_dict
from tests.convert.helpers import meta_params, write_meta_folder
from tests.helpers import assert_cli_error, random_state_dict, run_cli

CONFIG = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16)
Case = Callable[[Path, Path, Path], tuple[list, list[str]]]  # (work dir, assets, stories260K folder)


def meta_folder(folder: Path, **changed: torch.Tensor) -> Path:
    weights = {**random_state_dict(CONFIG), **changed}
    return write_meta_folder(folder, weights, meta_params(CONFIG))


def hf_folder(folder: Path, **changed: torch.Tensor) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config_dict(CONFIG)))
    save_file({**to_hf_state_dict(random_state_dict(CONFIG), CONFIG), **changed}, folder / "model.safetensors")
    return folder


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def missing_params(work: Path, assets: Path, stories: Path):
    folder = meta_folder(work / "meta")
    (folder / "params.json").unlink()
    return ["convert", folder, "--out_dir", work / "out"], [str(folder / "params.json"), "missing"]


def meta_wrong_shape(work: Path, assets: Path, stories: Path):
    folder = meta_folder(work / "meta", **{"layers.1.attention.wk.weight": torch.zeros(12, 32)})
    argv = ["convert", folder, "--out_dir", work / "out", "--tokenizer", assets / "stories260K" / "tok512.model"]
    return argv, [str(folder / "consolidated.00.pth"), "'layers.1.attention.wk.weight' has shape [12, 32]",
                  "expected [16, 32]"]


def hf_wrong_shape(work: Path, assets: Path, stories: Path):
    folder = hf_folder(work / "hf", **{"model.layers.1.mlp.down_proj.weight": torch.zeros(32, 10)})
    argv = ["convert", folder, "--out_dir", work / "out", "--tokenizer", assets / "stories260K" / "tok512.model"]
    return argv, [str(folder / "model.safetensors"), "'model.layers.1.mlp.down_proj.weight' has shape [32, 10]"]


def unknown_format(work: Path, assets: Path, stories: Path):
    path = work / "weights.npz"
    path.write_bytes(b"\x93NUMPY not a checkpoint")
    return ["convert", path, "--out_dir", work / "out"], [str(path), "unknown checkpoint format"]


def truncated_bin(work: Path, assets: Path, stories: Path):
    path = work / "stories260K.bin"
    path.write_bytes((assets / "stories260K" / "stories260K.bin").read_bytes()[:500_000])
    argv = ["convert", path, "--out_dir", work / "out", "--tokenizer", assets / "stories260K" / "tok512.model"]
    return argv, [str(path), "truncated llama2.c file"]


def convert_without_tokenizer(work: Path, assets: Path, stories: Path):
    path = work / "model" / "stories260K.bin"
    path.parent.mkdir()
    shutil.copyfile(assets / "stories260K" / "stories260K.bin", path)
    return ["convert", path, "--out_dir", work / "out"], [str(path), "no tokenizer.model found", "--tokenizer"]


def missing_checkpoint_folder(work: Path, assets: Path, stories: Path):
    folder = work / "no-such-checkpoint"
    return ["generate", "--checkpoint_dir", folder], [str(folder), "checkpoint folder not found"]


def corrupt_checkpoint_weights(work: Path, assets: Path, stories: Path):
    folder = copy_checkpoint(stories, work / "ckpt")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    return ["generate", "--checkpoint_dir", folder], [str(path), "cannot read safetensors file"]


CASES: dict[str, Case] = {case.__name__: case for case in (
    missing_params, meta_wrong_shape, hf_wrong_shape, unknown_format, truncated_bin, convert_without_tokenizer,
    missing_checkpoint_folder, corrupt_checkpoint_weights,
)}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory, assets: Path, stories260k_dir: Path) -> dict:
    prepared = {}
    for name, case in CASES.items():
        work = tmp_path_factory.mktemp(name)
        prepared[name] = (*case(work, assets, stories260k_dir), work)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = {name: pool.submit(run_cli, *argv) for name, (argv, _, _) in prepared.items()}
        return {name: (results[name].result(), fragments, work) for name, (_, fragments, work) in prepared.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_error(case: str, outcomes: dict) -> None:
    result, fragments, work = outcomes[case]
    line = assert_cli_error(result, *fragments)
    print(f"{case}: {line}")
    assert not (work / "out").exists() or not any((work / "out").iterdir()), "a failed convert left files behind"


def test_loader_errors_in_process(tmp_path: Path, assets: Path, stories260k_dir: Path) -> None:
    """More bad files, through the loaders the CLI calls (same messages, without a process each)."""
    from lit_adapter.checkpoint import load_model, tokenizer_path
    from lit_adapter.convert import load_source
    from lit_adapter.errors import LitAdapterError

    folder = copy_checkpoint(stories260k_dir, tmp_path / "ckpt")
    (folder / "tokenizer.model").unlink()
    with pytest.raises(LitAdapterError, match=rf"{folder / 'tokenizer.model'}: tokenizer missing"):
        tokenizer_path(folder)
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(LitAdapterError, match=rf"{folder / 'model.safetensors'}: cannot read safetensors file"):
        load_model(folder)

    folder = hf_folder(tmp_path / "hf")
    path = folder / "model.safetensors"
    path.write_bytes(b"\xff" * 64 + path.read_bytes()[64:])
    with pytest.raises(LitAdapterError, match=rf"{path}: cannot read safetensors file \(.*header"):
        load_source(folder)

    folder = meta_folder(tmp_path / "meta")
    path = folder / "consolidated.00.pth"
    path.write_bytes(path.read_bytes()[:20_000])
    with pytest.raises(LitAdapterError, match=rf"{path}: not a readable torch checkpoint \(truncated or corrupt"):
        load_source(folder)
    path.write_bytes(b"")
    with pytest.raises(LitAdapterError, match=rf"{path}: not a readable torch checkpoint"):
        load_source(folder)
