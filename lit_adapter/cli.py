"""The `lit-adapter` command: routes subcommands; turns LitAdapterError into one line on stderr and exit 2."""

from __future__ import annotations

import importlib
import sys
from typing import Optional

from lit_adapter.errors import LitAdapterError

# subcommand -> (module:function run through jsonargparse, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("lit_adapter.training.cli:fit_main", "train adapters from a config (LightningCLI)"),
    "validate": ("lit_adapter.training.cli:validate_main", "run validation from a config (LightningCLI)"),
    "convert": ("lit_adapter.convert:convert", "convert a Meta, Hugging Face or llama2.c checkpoint"),
    "generate": ("lit_adapter.inference.cli:generate_main", "generate text, optionally with an adapter and an image"),
    "chat": ("lit_adapter.inference.cli:chat_main", "multi-turn chat with a model and adapter"),
    "merge": ("lit_adapter.adapters.merge:merge", "fold bias/scale and LoRA into the base weights"),
    "eval": ("lit_adapter.evaluation.cli:eval_main", "evaluate (`lit-adapter eval scienceqa ...`)"),
    "download": ("lit_adapter.download:download", "fetch a known small checkpoint (stories260K) into a cache"),
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
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    try:
        command = load_command(name)
        if name in SELF_PARSING:
            command(rest)
        else:
            from jsonargparse import CLI

            if name in POSITIONAL and rest and not rest[0].startswith("-"):
                rest = [f"--{POSITIONAL[name]}", *rest]
            CLI(command, args=rest, prog=f"lit-adapter {name}", as_positional=False)
    except LitAdapterError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
