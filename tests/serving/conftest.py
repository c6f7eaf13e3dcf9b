"""Fixtures of the server tests: a multimodal V2 adapter on stories260K (open gates, CLIP weights in a file so
every load is the same model), servers on free ports of 127.0.0.1, and `lit-adapter generate` as the reference."""

from __future__ import annotations

import base64
import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lit_adapter.adapters import AdapterConfig, attach_adapters, save_adapter
from lit_adapter.adapters.visual import TINY_CLIP_MODEL, VisualConfig
from lit_adapter.checkpoint import load_model
from tests.helpers import write_image

MODEL = "tiny"  # the model name the test servers answer to


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    """torch on one thread: the tiny models decode faster so, and the tests share two cores with the server."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def serve_adapter(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A V2 adapter (bias/scale, norms, prompts, early-fusion visual prompt) with every gate open, saved with our
    writer; its tiny CLIP tower's weights are a file, so each load builds the same tower. The greedy answers differ
    from the base model's and between images (tests/serving/test_api.py checks both)."""
    from lit_adapter.adapters.visual import load_open_clip

    folder = tmp_path_factory.mktemp("serve_adapter")
    torch.manual_seed(0)
    clip = folder / "tiny_clip.pt"
    torch.save(load_open_clip().create_model(TINY_CLIP_MODEL).state_dict(), clip)
    visual = VisualConfig(clip_model=TINY_CLIP_MODEL, clip_pretrained=str(clip), visual_len=4, n_blocks=1,
                          block_heads=2)
    config = AdapterConfig.v2(adapter_len=5, adapter_layers=4, visual=visual)
    model = attach_adapters(load_model(stories260k_dir), config).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # open but gentle: the answers change, and still read like stories
        for name, param in model.adapter_parameters().items():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("visual_gate"):
                param.copy_(0.5 + 0.3 * noise)
            elif name.endswith("gate"):
                param.copy_(0.1 + 0.05 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.02 * noise)
            elif name.endswith(".scale"):
                param.copy_(1 + 0.02 * noise)
    return save_adapter(model, folder / "adapter")


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    return {"red": write_image(folder / "red.png", (220, 20, 20)),
            "blue": write_image(folder / "blue.png", (0, 0, 220))}


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@contextlib.contextmanager
def running_server(checkpoint_dir: Path, adapter: Any = None, **options: Any) -> Iterator[Any]:
    """`lit-adapter serve`'s app on a free port of 127.0.0.1, on a background thread."""
    from lit_adapter.serving.app import ServerThread
    from lit_adapter.serving.cli import build_app

    app = build_app(checkpoint_dir, adapter, model_name=MODEL, **options)
    with ServerThread(app) as server:
        server.app = app
        yield server


def generate_json(checkpoint_dir: Path, adapter: Any, *args: Any, messages: Any = None,
                  tmp_path: Path = None) -> dict:
    """`lit-adapter generate ... --json` run through the real CLI entry (in this process): its JSON record.

    `messages` (a list) is written to a file for `--messages`."""
    from lit_adapter.cli import main

    argv = ["generate", "--checkpoint_dir", str(checkpoint_dir), *(["--adapter", str(adapter)] if adapter else []),
            *map(str, args), "--json"]
    if messages is not None:
        path = tmp_path / f"messages_{abs(hash(json.dumps(messages)))}.json"
        path.write_text(json.dumps(messages))
        argv += ["--messages", str(path)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exit_:
            raise AssertionError(f"generate failed ({exit_.code}): {err.getvalue()}") from None
    return json.loads(out.getvalue())


def health(server: Any) -> dict:
    import httpx

    return httpx.get(f"{server.url}/health", timeout=10).json()
