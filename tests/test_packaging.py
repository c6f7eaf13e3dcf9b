"""The wheel a plain `pip install .` builds carries the whole package: every module and the data files it reads,
with no warning from setuptools."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_module_and_data_file(tmp_path: Path) -> None:
    # no build isolation: setuptools of this environment, nothing fetched
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
             str(ROOT)]  # fmt: skip
    result = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # setuptools warns of a folder of files that `packages` misses (and later versions may leave it out)
    assert "absent from the `packages` configuration" not in result.stdout + result.stderr
    (wheel,) = tmp_path.glob("lit_adapter-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    package = ROOT / "lit_adapter"
    modules = {p.relative_to(ROOT).as_posix() for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    assert modules - names == set()
    # what the package opens at run time: the chat page `serve` hands out and the stored `--help` texts
    assert {"lit_adapter/serving/static/index.html", "lit_adapter/cli_help_texts.json"} <= names
    assert not any("__pycache__" in name for name in names)
