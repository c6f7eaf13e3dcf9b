"""Helpers shared by the test folders: the real CLI in a subprocess, random weights, tiny visual configs, images."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from lit_adapter.config import ModelConfig

if TYPE_CHECKING:
    from lit_adapter.adapters import VisualConfig

REPO_ROOT = Path(__file__).resolve().parents[1]

def run_cli(
    *args: str, stdin: Optional[str] = None, env: Optional[dict[str, str]] = None, timeout: float = 120,
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    """`lit-adapter ARGS` as its own process (one thread: the tiny models run faster that way), forked from the
    session's process that has the heavy modules imported already (`tests.cli_runner`); `fresh`: a new interpreter
    (`python -m lit_adapter.cli`), for what happens while modules import (environment read at import time)."""
    if fresh:
        return subprocess.run([sys.executable, "-m", "lit_adapter.cli", *map(str, args)], input=stdin,
                              capture_output=True, text=True, env=cli_environment(env), timeout=timeout,
                              cwd=REPO_ROOT)
    return run_cli_together([list(args)], [env], stdin, timeout)[0]


def run_cli_together(commands: list[list], envs: list[Optional[dict[str, str]]], stdin: Optional[str] = None,
                     timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Several `lit-adapter` commands running at the same time (each with its own extra environment), forked as
    `run_cli` forks one; their results in order."""
    from tests.cli_runner import run_forked

    with tempfile.TemporaryDirectory(prefix="lit-adapter-cli-") as root:
        requests = []
        for index, (args, env) in enumerate(zip(commands, envs, strict=True)):
            full = cli_environment(env)
            out = Path(root) / str(index)
            out.mkdir()
            requests.append({"argv": list(map(str, args)), "cwd": str(REPO_ROOT), "environ": full, "stdin": stdin,
                             "out": str(out), "pythonpath": [p for p in full["PYTHONPATH"].split(os.pathsep) if p]})
        codes, _ = run_forked(requests, timeout)
        return [subprocess.CompletedProcess(["lit-adapter", *request["argv"]], code,
                                            *(_universal_newlines((Path(request["out"]) / name).read_bytes())
                                              for name in ("stdout", "stderr")))
                for request, code in zip(requests, codes, strict=True)]


def cli_environment(env: Optional[dict[str, str]]) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **(env or {})}


def _universal_newlines(data: bytes) -> str:
    """Text as `subprocess.run(text=True)` gives it: "\\r\\n" and "\\r" read as "\\n"."""
    return data.decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def run_main(args: list[str], capsys, monkeypatch=None, stdin: str = "") -> tuple[int, str, str]:
    """`lit_adapter.cli.main(args)` in this process: (exit code, stdout, stderr), stdin from `stdin`."""
    from lit_adapter.cli import main

    if monkeypatch is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_cli_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, exactly one line on stderr, no traceback, and the line names every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def random_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Unit-scale random weights (peaked attention, logits of order 1), so layout mistakes show in the logits."""
    from lit_adapter.checkpoint import expected_shapes

    torch.manual_seed(seed)
    return {
        k: (1 + 0.2 * torch.randn(shape)) if len(shape) == 1 else torch.randn(shape) * shape[-1] ** -0.5
        for k, shape in expected_shapes(config).items()
    }


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw a (Hugging Face) model's weights at unit scale, like `random_state_dict`."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0, param.shape[-1] ** -0.5)
    return model


def tiny_visual(clip_weights: Optional[Path] = None, **overrides) -> VisualConfig:
    """The tiny open_clip tower (random weights, or those of `clip_weights`) with a one-block visual adapter."""
    from lit_adapter.adapters.clip import TINY_CLIP_MODEL
    from lit_adapter.adapters.visual import VisualConfig

    weights = str(clip_weights) if clip_weights is not None else None
    fields = dict(clip_model=TINY_CLIP_MODEL, clip_pretrained=weights, visual_len=3, n_blocks=1, block_heads=2)
    return VisualConfig(**{**fields, **overrides})


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: int = 48) -> Path:
    """A small RGB image with some structure (two images differ beyond their mean colour)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), color)
    for x in range(0, size, 4):
        image.putpixel((x, x), (255 - color[0], 255 - color[1], 255 - color[2]))
    image.save(path)
    return path


def family_checkpoints(root: Path, assets: Path, families: dict, seed: int = 0) -> dict[str, Path]:
    """family -> a checkpoint folder under `root` with random weights (seeds from `seed` on) and the tok512
    tokenizer."""
    from lit_adapter.checkpoint import save_checkpoint

    tokenizer = assets / "stories260K" / "tok512.model"
    return {family: save_checkpoint(root / family, random_state_dict(config, seed + index), config, tokenizer)
            for index, (family, config) in enumerate(families.items())}
