"""Bad checkpoint files through the loaders the CLI calls: one-line errors naming the file and the problem.

The same inputs through the real CLI (exit status 2, one line, no traceback) are rows of tests/test_cli_errors.py,
which also uses this module's small Meta and Hugging Face folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lit_adapter.config import ModelConfig
from lit_adapter.convert.hf import hf_config_dict, to_hf_state_dict
from tests.convert.helpers import meta_params, write_meta_folder
from tests.helpers import random_state_dict

CONFIG = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16)


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
