"""The `lit-adapter` command: routes subcommands; every failure ends as one line on stderr.

A LitAdapterError (a problem with the user's input; argument errors become one too) exits 2. Any other exception
is a fault of ours: one line naming it and the debug variable, exit 1; with LIT_ADAPTER_DEBUG=1 the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

from lit_adapter.errors import DEBUG_ENV, LitAdapterError, first_line, user_error_in

# subcommand -> (module:function run through jsonargparse, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("lit_adapter.training.cli:fit_main", "train adapters from a config (LightningCLI)"),
    "validate": ("lit_adapter.training.cli:validate_main", "run validation from a config (LightningCLI)"),
    "convert": ("lit_adapter.convert:convert", "convert a Meta, Hugging Face or llama2.c checkpoint"),
    "generate": ("lit_adapter.inference.cli:generate_main", "generate text, optionally with an adapter and an image"),
    "chat": ("lit_adapter.inference.cli:chat_main", "multi-turn chat with a model and adapter"),
    "merge": ("lit_adapter.adapters.merge:merge", "fold bias/scale and LoRA into the base weights"),
    "eval": ("lit_adapter.evaluation.cli:eval_main", "evaluate (`lit-adapter eval scienceqa ...`)"),
    "download": ("lit_adapter.download:download",
                 "fetch stories260K or a Hugging Face Hub repo (ORG/NAME), convert it"),
}

# commands whose module parses its own arguments (LightningCLI, nested subcommands): called as f(argv)
SELF_PARSING = {"fit", "validate", "eval", "generate", "chat"}

# the one positional argument a command takes (every other argument is a --flag)
POSITIONAL = {"convert": "source", "download": "name"}


def usage() -> str:
    lines = ["usage: lit-adapter COMMAND [options]   (`lit-adapter COMMAND --help` lists its options)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def load_command(name: str):
    module, function = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from lit_adapter.arguments import did_you_mean

        print(f"error: unknown command {name!r}{did_you_mean(name, COMMANDS)}; the commands are "
              f"{', '.join(COMMANDS)} (`lit-adapter --help` says what each does)", file=sys.stderr)
        sys.exit(2)
    try:
        run_command(name, rest)
    except LitAdapterError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:
        wrapped = user_error_in(err)
        if wrapped is not None:
            print(f"error: {one_line(str(wrapped))}", file=sys.stderr)
            sys.exit(2)
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"error: unexpected {type(err).__name__} in `lit-adapter {name}`: {first_line(err)} (set "
              f"{DEBUG_ENV}=1 for the full traceback)", file=sys.stderr)
        sys.exit(1)


def run_command(name: str, rest: list[str]) -> None:
    command = load_command(name)
    if name in SELF_PARSING:
        command(rest)
        return
    from lit_adapter.arguments import run_function_cli

    if name in POSITIONAL and rest and not rest[0].startswith("-"):
        rest = [f"--{POSITIONAL[name]}", *rest]
    run_function_cli(command, rest, f"lit-adapter {name}")


def one_line(message: str) -> str:
    """A message as one line (a foreign message kept in ours may bring its own line breaks)."""
    return " ".join(message.split())


if __name__ == "__main__":
    main()
