"""Starting fast: `--help` of every command from the stored texts (equal to the live parsers' help), `--version`,
neither importing torch; text-only `generate` never importing open_clip (its tower is built on the first image)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from lit_adapter.cli_help import help_keys, importable, stored_help
from tests.helpers import REPO_ROOT, run_main

PROBE = """
import io, json, sys, time
from contextlib import redirect_stdout
start = time.perf_counter()
from lit_adapter.cli import main
texts = {}
for argv in ARGVS:
    out = io.StringIO()
    with redirect_stdout(out):
        main(argv)
    texts[" ".join(argv)] = out.getvalue()
seconds = time.perf_counter() - start
heavy = sorted(m for m in ("torch", "lightning", "jsonargparse", "open_clip") if m in sys.modules)
print(json.dumps({"heavy": heavy, "seconds": seconds, "texts": texts}))
"""


def probe(argvs: list[list[str]]) -> dict:
    script = PROBE.replace("ARGVS", repr(argvs))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=120, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def package_imports_torch() -> bool:
    result = subprocess.run([sys.executable, "-c", "import sys, lit_adapter; print('torch' in sys.modules)"],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    return result.stdout.strip() == "True"


def test_the_stored_help_of_every_command_is_its_live_help() -> None:
    # in a fresh process, as `python -m lit_adapter.cli_help` makes them (fit's help lists the classes imported)
    script = "import json; from lit_adapter.cli_help import live_texts; print(json.dumps(live_texts()))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=300, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    live = json.loads(result.stdout)
    assert {"fit", "generate", "chat", "convert", "eval scienceqa"} <= set(live)
    stale = [key for key, text in live.items() if stored_help(key) != text]
    assert not stale, f"stored --help texts differ from the live ones for {stale}: run `python -m lit_adapter.cli_help`"


@pytest.mark.xfail(package_imports_torch(), strict=True,
                   reason="`import lit_adapter` imports torch (lit_adapter/__init__.py is not lazy yet)")
def test_help_and_version_start_without_torch() -> None:
    argvs = [["--help"], ["--version"], *([*key.split(), "--help"] for key in help_keys() if importable(key))]
    found = probe(argvs)
    assert found["heavy"] == [], found["heavy"]
    assert found["seconds"] < 0.5, found["seconds"]  # every command's help, in one process
    for argv in argvs[2:]:
        assert found["texts"][" ".join(argv)] == stored_help(" ".join(argv[:-1]))


def test_version_comes_from_the_installed_package(capsys) -> None:
    code, out, _ = run_main(["--version"], capsys)
    assert code == 0 and out == f"lit-adapter {version('lit-adapter')}\n"


def test_convert_help_shows_the_source_as_positional() -> None:
    text = stored_help("convert")
    usage = " ".join(text.split("\n\n")[0].split())
    assert usage.startswith("usage: lit-adapter convert") and " SOURCE" in usage and "--source" not in usage, usage
    code_help = stored_help("download")
    assert "[NAME]" in " ".join(code_help.split("\n\n")[0].split())


@pytest.fixture(scope="module")
def visual_adapter_dir(stories260k_dir: Path, tmp_path_factory) -> Path:
    """An adapter of ours with the tiny open_clip tower in its config (random init: built only for an image)."""
    import torch

    from lit_adapter.adapters import AdapterConfig, attach_adapters, save_adapter
    from lit_adapter.checkpoint import load_model
    from tests.helpers import tiny_visual

    torch.manual_seed(0)
    config = AdapterConfig.v2(adapter_len=3, adapter_layers=2, visual=tiny_visual(visual_len=3))
    model = attach_adapters(load_model(stories260k_dir), config, load_clip=False)
    return save_adapter(model, tmp_path_factory.mktemp("visual-adapter"))


def test_text_only_generate_never_imports_open_clip_timm_or_torchvision(stories260k_dir: Path,
                                                                         visual_adapter_dir: Path) -> None:
    script = (
        "import sys; from lit_adapter.cli import main; "
        f"main(['generate', '--checkpoint_dir', {str(stories260k_dir)!r}, '--adapter', {str(visual_adapter_dir)!r}, "
        "'--prompt', 'Hi', '--max_new_tokens', '4', '--temperature', '0', '--json']); "
        "print(sorted(m for m in ('open_clip', 'timm', 'torchvision') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=120, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin",
                                              "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    record, imported = result.stdout.strip().splitlines()
    assert json.loads(record)["new_tokens"] == 4
    assert imported == "[]", imported  # none of open_clip, timm (the ViT blocks are ours) or torchvision


def test_generate_as_the_program_ends_at_once_and_quietly_when_its_reader_goes(stories260k_dir, capsys,
                                                                              monkeypatch) -> None:
    """Run as the console script, `generate` ends through `exit_now` (no interpreter teardown) with all its output
    written (as the same command run in this process, which returns normally, prints it); a reader that leaves
    early (`| head -c 20`) ends it as SIGPIPE would, with nothing on stderr."""
    args = ["generate", "--checkpoint_dir", str(stories260k_dir), "--max_new_tokens", "40", "--temperature", "0",
            "--prompt", "Once upon a time"]  # fmt: skip
    command = [str(Path(sys.executable).with_name("lit-adapter")), *args]
    whole = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert whole.returncode == 0, whole.stderr
    code, out, _ = run_main(args, capsys, monkeypatch)
    assert code == 0 and whole.stdout == out and out.strip() and "40 tokens in" in whole.stderr
    process = subprocess.Popen([*command[:5], "200", *command[6:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.read(20)
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 141 and stderr == b"", stderr
