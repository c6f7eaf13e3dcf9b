"""The `--help` text of every command, stored in the package so that `lit-adapter COMMAND --help` answers at once.

A command's live help needs its parser, and its parser needs the command's module: torch, and for `fit` and
`validate` Lightning (two seconds and more). The texts in `cli_help_texts.json` are the live ones, printed by running
each command with `--help` at a fixed width of `COLUMNS` characters; `lit-adapter COMMAND --help` (or `-h`) prints the
stored text when the arguments are exactly that. After changing a command's options or docstrings, regenerate them:

    python -m lit_adapter.cli_help

(tests/test_startup.py regenerates every text in a fresh process and fails while a stored one differs from it.)
"""

from __future__ import annotations

import io
import json
import os
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Optional

COLUMNS = 80  # the width the stored texts are wrapped at: any terminal shows them as they are
TEXTS_FILE = Path(__file__).with_name("cli_help_texts.json")
HELP_FLAGS = ("--help", "-h")
# commands with subcommands of their own: their help texts are stored too
SUBCOMMANDS = {"eval": ("scienceqa", "lm-eval")}


def help_key(argv: list[str]) -> Optional[str]:
    """The stored text's key ("fit", "eval scienceqa") when `argv` asks for exactly a command's help, else None."""
    if len(argv) < 2 or argv[-1] not in HELP_FLAGS:
        return None
    words = argv[:-1]
    if len(words) == 1 or (len(words) == 2 and words[1] in SUBCOMMANDS.get(words[0], ())):
        return " ".join(words)
    return None


def stored_help(key: str) -> Optional[str]:
    """The stored help text for `key`, or None (not stored: the live parser answers)."""
    try:
        texts = json.loads(TEXTS_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return texts.get(key)


def help_keys() -> list[str]:
    """Every command's key, and its subcommands' ("eval scienceqa")."""
    from lit_adapter.cli import COMMANDS

    return [key for name in COMMANDS for key in (name, *(f"{name} {sub}" for sub in SUBCOMMANDS.get(name, ())))]


def live_help(key: str) -> str:
    """What the command's own parser prints for `--help`, at `COLUMNS` characters."""
    from lit_adapter.cli import run_command

    name, *rest = key.split()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(COLUMNS)  # argparse and jsonargparse wrap at the width COLUMNS says
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            run_command(name, [*rest, "--help"])
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return out.getvalue()


def importable(key: str) -> bool:
    """Whether the command's module is there (a command being added may not be yet)."""
    import importlib.util

    from lit_adapter.cli import COMMANDS

    module = COMMANDS[key.split()[0]][0].split(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def live_texts() -> dict[str, str]:
    """Every command's live help (commands whose module is missing are left out), in `help_keys` order.

    Run it in a fresh process (as `python -m lit_adapter.cli_help` does): the help of `fit` lists the callback and
    logger classes imported so far, so a process that has imported others prints more."""
    return {key: live_help(key) for key in help_keys() if importable(key)}


def write_texts(path: Path = TEXTS_FILE) -> list[str]:
    """Regenerate the stored texts from the live parsers (generated data: `python -m lit_adapter.cli_help`, never
    edited by hand); returns the keys written."""
    from lit_adapter.files import write_text

    texts = live_texts()
    write_text(json.dumps(texts, indent=1, ensure_ascii=False) + "\n", path)
    return list(texts)


if __name__ == "__main__":
    written = write_texts()
    print(f"wrote the help of {len(written)} commands to {TEXTS_FILE}", file=sys.stderr)
