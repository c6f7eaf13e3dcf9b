"""open_clip and timm (and torchvision through them) load only when the visual path is used, never on plain import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VISUAL_MODULES = ("open_clip", "timm", "torchvision")
# Text-only entry points: none of open_clip, timm or torchvision.
TEXT_ONLY = (
    "lit_adapter.adapters",
    "lit_adapter.adapters.formats",
    "lit_adapter.adapters.model",
    "lit_adapter.adapters.merge",
    "lit_adapter.adapters.groups",
    "lit_adapter.model",
    "lit_adapter.inference.generate",
    "lit_adapter.inference.engine",
    "lit_adapter.images",
    "lit_adapter.cli",
)
# These import lightning, and lightning itself imports torchvision: only open_clip and timm must stay out.
WITH_LIGHTNING = (
    "lit_adapter.training.module",
    "lit_adapter.data.caption",
    "lit_adapter.data.scienceqa",
)


def run_python(code: str) -> dict:
    """Runs `code` in a fresh interpreter from the repository root; it prints one JSON object as its last line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def loaded_after(modules: tuple[str, ...]) -> dict:
    return run_python(f"""
        import importlib, json, sys
        found = {{}}
        for name in {modules!r}:
            importlib.import_module(name)
            found[name] = [m for m in {VISUAL_MODULES!r} if m in sys.modules]
        print(json.dumps(found))
    """)


def test_lightning_modules_load_neither_open_clip_nor_timm():
    found = loaded_after(WITH_LIGHTNING)
    for name in WITH_LIGHTNING:
        assert "open_clip" not in found[name] and "timm" not in found[name], (name, found[name])


def test_text_only_imports_load_no_vision_libraries_and_the_tiny_tower_registers_on_first_use():
    """Every text-only entry point leaves the vision libraries out; the tiny test tower is then registered the first
    time open_clip is used, and the adapter builds and runs (one fresh interpreter for both)."""
    out = run_python(f"""
        import importlib, json, sys
        found = {{}}
        for name in {TEXT_ONLY!r}:
            importlib.import_module(name)
            found[name] = [m for m in {VISUAL_MODULES!r} if m in sys.modules]
        import torch
        from lit_adapter.adapters import visual
        before = [m for m in ("open_clip", "timm") if m in sys.modules]
        from tests.adapters.helpers import images, tiny_visual

        config = tiny_visual()
        adapter = visual.VisualAdapter(config, llama_dim=16)
        tokens = adapter(images())
        transform = visual.image_transform(visual.TINY_CLIP_MODEL, train=False)
        import open_clip

        print(json.dumps({{
            "found": found,
            "before": before,
            "shape": list(tokens.shape),
            "finite": bool(torch.isfinite(tokens).all()),
            "tiny_listed": open_clip.list_models().count(visual.TINY_CLIP_MODEL),
            "same_module": visual.load_open_clip() is open_clip,
            "transform": type(transform).__name__,
        }}))
    """)
    assert out["found"] == {name: [] for name in TEXT_ONLY}
    assert out["before"] == []
    assert out["shape"] == [2, 3, 16] and out["finite"]
    assert out["tiny_listed"] == 1 and out["same_module"]
    assert out["transform"] == "Compose"
