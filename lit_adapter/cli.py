"""The `lit-adapter` command: routes subcommands; every failure ends as one line on stderr.

A LitAdapterError (a problem with the user's input; argument errors become one too) exits 2. Any other exception
is a fault of ours: one line naming it and the debug variable, exit 1; with LIT_ADAPTER_DEBUG=1 the traceback.

`lit-adapter --help`, `--version` and `lit-adapter COMMAND --help` import neither torch nor the command's module: the
command's help is the text its parser printed, stored in the package (`lit_adapter.cli_help`).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

from lit_adapter.errors import DEBUG_ENV, EveryRankError, LitAdapterError, first_line, user_error_in

# subcommand -> (module:function run through jsonargparse, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("lit_adapter.training.cli:fit_main", "train adapters from a config (LightningCLI)"),
    "validate": ("lit_adapter.training.cli:validate_main", "run validation from a config (LightningCLI)"),
    "convert": ("lit_adapter.convert:convert", "convert a Meta, Hugging Face or llama2.c checkpoint"),
    "generate": ("lit_adapter.inference.cli:generate_main", "generate text, optionally with an adapter and an image"),
    "chat": ("lit_adapter.inference.cli:chat_main", "multi-turn chat with a model and adapter"),
    "merge": ("lit_adapter.adapters.merge:merge", "fold bias/scale and LoRA into the base weights"),
    "eval": ("lit_adapter.evaluation.cli:eval_main", "evaluate (`lit-adapter eval scienceqa|lm-eval ...`)"),
    "download": ("lit_adapter.download:download",
                 "fetch stories260K or a Hugging Face Hub repo (ORG/NAME), convert it"),
    "export": ("lit_adapter.convert.export:export",
               "write a model (+ adapter) as a Hugging Face, PEFT or LitGPT folder"),
    "serve": ("lit_adapter.serving.cli:serve_main", "an OpenAI-compatible server with a browser chat"),
}

# commands whose module parses its own arguments (LightningCLI, nested subcommands): called as f(argv)
SELF_PARSING = {"fit", "validate", "eval", "generate", "chat", "serve"}

# one-shot commands whose files are all written and closed when they return: run as the program, they end with
# `exit_now` rather than the interpreter's slow teardown
FAST_EXIT = {"generate", "chat"}

# the one positional argument a command takes (every other argument is a --flag)
POSITIONAL = {"convert": "source", "download": "name"}


def usage() -> str:
    lines = ["usage: lit-adapter COMMAND [options]   (`lit-adapter COMMAND --help` lists its options)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def load_command(name: str):
    module, function = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


def version() -> str:
    """The installed package's version (its metadata: nothing heavy is imported)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("lit-adapter")
    except PackageNotFoundError:
        return "unknown (not installed; `pip install -e .` installs it)"


def main(argv: Optional[list[str]] = None) -> None:
    """The `lit-adapter` program (argv None: the command line) or one command in this process (argv given)."""
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv == ["--version"]:
        print(f"lit-adapter {version()}")
        return
    if argv[0] in COMMANDS and print_stored_help(argv):
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
        if not (isinstance(err, EveryRankError) and global_rank() > 0):
            print(f"error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (`| head`): end as a program killed by SIGPIPE, without a word
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush must not fail again
        sys.exit(141)
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
    if as_program and name in FAST_EXIT:
        exit_now()


def exit_now() -> None:
    """End the process at once, its output flushed: the interpreter's own exit would spend 1-2 s on a small CPU
    tearing down what torch's import built, a third of a short `generate`. Only for one-shot commands run as the
    program (`FAST_EXIT`), whose files are all written and closed by then and which register no exit handlers."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing more can reach it
            pass
    os._exit(0)


def global_rank() -> int:
    """This process's rank in a distributed run (0 outside one; known once Lightning has set up its processes)."""
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    return getattr(getattr(rank_zero, "rank_zero_only", None), "rank", 0) or 0


def print_stored_help(argv: list[str]) -> bool:
    """Print the stored help when `argv` is exactly `COMMAND [SUBCOMMAND] --help`; False when there is none."""
    from lit_adapter.cli_help import help_key, stored_help

    key = help_key(argv)
    text = stored_help(key) if key is not None else None
    if text is None:
        return False
    sys.stdout.write(text)
    return True


def run_command(name: str, rest: list[str]) -> None:
    command = load_command(name)
    if name in SELF_PARSING:
        command(rest)
        return
    from lit_adapter.arguments import run_function_cli

    if name in POSITIONAL and any(arg in ("-h", "--help") for arg in rest):
        print_positional_help(name, lambda: run_function_cli(command, rest, f"lit-adapter {name}"))
        return
    if name in POSITIONAL and rest and not rest[0].startswith("-"):
        rest = [f"--{POSITIONAL[name]}", *rest]
    run_function_cli(command, rest, f"lit-adapter {name}")


def print_positional_help(name: str, show_help) -> None:
    """The parser's help with the command's positional argument written as one in the usage line (`SOURCE`,
    optional ones `[NAME]`): the parser itself takes it as `--source`, which `run_command` passes it as."""
    import contextlib
    import io
    import re

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            show_help()
    finally:
        text = out.getvalue()
        usage, blank, rest = text.partition("\n\n")
        option, metavar = f"--{POSITIONAL[name]}", POSITIONAL[name].upper()
        usage = re.sub(rf"\[{option} {metavar}\]", f"[{metavar}]", usage)
        usage = re.sub(rf"(?<![\w-]){option} {metavar}", metavar, usage)
        sys.stdout.write(usage + blank + rest)


def one_line(message: str) -> str:
    """A message as one line (a foreign message kept in ours may bring its own line breaks)."""
    return " ".join(message.split())


if __name__ == "__main__":
    main()
