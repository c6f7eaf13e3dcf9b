"""Foreign checkpoint formats -> the checkpoint folder (`model.safetensors`, `model_config.yaml`, `tokenizer.model`)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal, Optional

import torch

from lit_adapter.checkpoint import save_checkpoint
from lit_adapter.config import ModelConfig
from lit_adapter.convert.meta_tokenizer import is_tiktoken_file, write_hf_tokenizer
from lit_adapter.errors import LitAdapterError
from lit_adapter.tokenizer import Tokenizer, find_tokenizer_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def detect_format(source: Path) -> str:
    if not source.exists():
        raise LitAdapterError(f"{source}: not found")
    if source.is_file():
        if source.suffix == ".bin" and source.stat().st_size >= 28 and not _is_torch_pickle(source):
            return "llama2c"
        raise LitAdapterError(
            f"{source}: unknown checkpoint format; expected a llama2.c `.bin`, a Meta folder "
            "(consolidated.*.pth + params.json) or a Hugging Face folder (config.json + weights)"
        )
    if (source / "config.json").is_file():
        return "hf"
    if any(source.glob("consolidated.*.pth")):
        if not (source / "params.json").is_file():
            raise LitAdapterError(f"{source / 'params.json'}: missing; a Meta checkpoint folder needs its params.json")
        return "meta"
    raise LitAdapterError(
        f"{source}: unknown checkpoint format; expected consolidated.*.pth + params.json (Meta) "
        "or config.json + model.safetensors / pytorch_model.bin (Hugging Face)"
    )


def _is_torch_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:2] == b"PK" or head[:1] == b"\x80"


def find_tokenizer(source: Path) -> Optional[Path]:
    """tokenizer.model (else tokenizer.json) beside the checkpoint or in a parent folder (Meta ships it one level
    up); the Hugging Face files beside it (tokenizer_config.json, generation_config.json, ...) travel with it."""
    folder = source if source.is_dir() else source.parent
    for candidate in (folder, folder.parent):
        if (found := find_tokenizer_file(candidate)) is not None:
            return found
    return None


def load_source(source: Path) -> tuple[str, ModelConfig, dict[str, torch.Tensor]]:
    fmt = detect_format(source)
    if fmt == "llama2c":
        from lit_adapter.convert.llama2c import load_llama2c as loader
    elif fmt == "meta":
        from lit_adapter.convert.meta import load_meta as loader
    else:
        from lit_adapter.convert.hf import load_hf as loader
    config, state_dict = loader(source)
    return fmt, config, state_dict


def convert(
    source: Path,
    out_dir: Path,
    tokenizer: Optional[Path] = None,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
) -> Path:
    """Convert a checkpoint into a lit-adapter checkpoint folder.

    Args:
        source: a Meta folder (consolidated.*.pth + params.json), a Hugging Face LlamaForCausalLM folder
            (config.json + model.safetensors / pytorch_model.bin, sharded or not) or a llama2.c legacy `.bin` file.
        out_dir: the folder to write (model.safetensors, model_config.yaml, tokenizer.model or tokenizer.json).
        tokenizer: the SentencePiece tokenizer.model or Hugging Face tokenizer.json (its tokenizer_config.json and
            generation_config.json beside it are copied too), or Llama 3's tiktoken tokenizer.model (written as a
            tokenizer.json with Meta's special tokens and chat format); found beside or above SOURCE when not given.
        dtype: the dtype of the written weights; by default the source's own (llama2.c files are float32).
    """
    source, out_dir = Path(source), Path(out_dir)
    detect_format(source)
    tokenizer = Path(tokenizer) if tokenizer is not None else find_tokenizer(source)
    if tokenizer is None:
        raise LitAdapterError(
            f"{source}: no tokenizer.model found beside or above it (nor a tokenizer.json); pass --tokenizer FILE"
        )
    with tempfile.TemporaryDirectory(prefix="lit-adapter-tokenizer-") as scratch:
        if is_tiktoken_file(tokenizer):  # Meta's Llama 3 folders
            tokenizer = write_hf_tokenizer(tokenizer, Path(scratch))
        return _convert(source, out_dir, tokenizer, dtype)


def _convert(source: Path, out_dir: Path, tokenizer: Path, dtype: Optional[str]) -> Path:
    vocab = Tokenizer(tokenizer).vocab_size
    fmt, config, state_dict = load_source(source)
    if vocab > config.vocab_size:
        raise LitAdapterError(
            f"{tokenizer}: tokenizer has {vocab} pieces but the model's embedding has {config.vocab_size} rows"
        )
    if dtype is not None:
        for key in list(state_dict):  # one tensor at a time, so the source and target copies never coexist in full
            state_dict[key] = state_dict[key].to(DTYPES[dtype])
    save_checkpoint(out_dir, state_dict, config, tokenizer)
    written = sorted({str(t.dtype).removeprefix("torch.") for t in state_dict.values()})
    print(f"converted {fmt} checkpoint {source} -> {out_dir} ({config.name}, {'/'.join(written)})")
    return out_dir
