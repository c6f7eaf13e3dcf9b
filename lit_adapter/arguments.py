"""Command-line argument errors as one line: jsonargparse's messages (several lines, the option's name buried in
them, sometimes after the whole usage) reduced to the option or config key at fault, what it expects, and a
"did you mean" when a known name is close."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

from lit_adapter.errors import LitAdapterError

_UNRECOGNIZED = re.compile(r"[Uu]nrecognized arguments: (\S+)")
_NOT_ACCEPTED = re.compile(
    r"Group '([^']+)' does not accept option '([^']+)'|does not accept option '([^']+)'|Option '([^']+)' is not "
    r"accepted|No action for key \"([^\"]+)\""
)
_REQUIRED = re.compile(r"following arguments are required: ([^\s,]+)|Key \"([^\"]+)\" is required")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_LITERAL = re.compile(r"Expected a (?:typing\.)?Literal\[(.*?)\]")
_GIVEN = re.compile(r"Given value: (.+)")
_GOT = re.compile(r"Got value: (.+)")
_CLASS_PROBLEM = re.compile(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)")
_EXPECTED_TYPE = re.compile(r"Expected an? <class '([\w.]+)'>")
_NOISE = ("Given value", "Got value", "Subtypes:", "Errors:", "Does not validate")
_CONFIG_KEYS = ("config", "__path__")


def run_function_cli(function: Callable, args: Sequence[str], prog: str) -> Any:
    """jsonargparse's CLI over one function, a bad argument raised as one LitAdapterError line."""
    from jsonargparse import CLI, ArgumentError, capture_parser

    try:
        return CLI(function, args=list(args), prog=prog, as_positional=False, exit_on_error=False)
    except ArgumentError as err:
        parser = capture_parser(lambda: CLI(function, args=[], prog=prog, as_positional=False))
        raise argument_error(err, parser, prog, args) from None


def did_you_mean(name: str, known: Iterable[str], prefix: str = "") -> str:
    """" (did you mean 'X'?)" for the closest known name (spelled with `prefix`, e.g. "--"), or ""."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def option_names(parser: Any) -> list[str]:
    """Every dotted option a jsonargparse parser knows (without the leading dashes), nested groups included."""
    names = []
    for action in getattr(parser, "_actions", []):
        options = [option.lstrip("-") for option in action.option_strings if option.startswith("--")]
        names += options
        for option in options:  # an option typed by a dataclass (model.adapter) takes its fields as keys
            names += _dataclass_keys(option, getattr(action, "_typehint", None))
    return [name for name in names if name.split(".")[-1] not in ("help", "print_config", *_CONFIG_KEYS)]


def _dataclass_keys(prefix: str, hint: Any, depth: int = 2) -> list[str]:
    import dataclasses
    import typing

    members = [arg for arg in typing.get_args(hint) if arg is not type(None)] or [hint]
    kind = next((member for member in members if dataclasses.is_dataclass(member)), None)
    if kind is None or depth == 0:
        return []
    hints = typing.get_type_hints(kind)
    keys = []
    for field in dataclasses.fields(kind):
        keys += [f"{prefix}.{field.name}", *_dataclass_keys(f"{prefix}.{field.name}", hints.get(field.name), depth - 1)]
    return keys


def argument_error(err: Exception, parser: Any, prog: str, args: Sequence[str] = ()) -> LitAdapterError:
    """A jsonargparse ArgumentError as one line naming the option or key (and the closest known one)."""
    text = str(err)
    known = option_names(parser)
    hint = f"`{prog} --help` lists the options"
    unrecognized = _UNRECOGNIZED.search(text)
    if unrecognized:
        name = unrecognized[1].split("=")[0].lstrip("-")
        return LitAdapterError(f"--{name}: unknown option{did_you_mean(name, known, '--')}; {hint}")
    where = _where(text, args)
    unknown = _NOT_ACCEPTED.search(text)
    if unknown:
        key = ".".join(p for p in unknown.groups()[:2] if p) or unknown[3] or unknown[4] or unknown[5]
        key = _full_key(_parser_keys(text), key)
        spelled = _spelled(key, args)
        where = where or (f"{_config_file(args)}: " if _config_file(args) and spelled == key else "")
        prefix = "--" if spelled != key else ""
        return LitAdapterError(f"{where}{spelled}: unknown key{did_you_mean(key, known, prefix)}; {hint}")
    required = _REQUIRED.search(text)
    if required:
        key = (required[1] or required[2]).lstrip("-")
        return LitAdapterError(f"--{key}: required, and not given; {hint}")
    keys = _parser_keys(text)
    if keys:
        key = _nested_key(keys, text)
        return LitAdapterError(f"{where}{_spelled(key, args)}: {_expected(text)}")
    if where:
        return LitAdapterError(f"{where.rstrip(': ')}: {_last_line(text)}")
    return LitAdapterError(" ".join(text.split()))


def _nested_key(keys: list[str], text: str) -> str:
    """The dotted key of a complaint nested in a class's arguments (`data.instruction` + `on_bad_record` ->
    data.instruction.init_args.on_bad_record)."""
    joint = ".init_args." if "class_path" in text else "."
    key = keys[0]
    for inner in keys[1:]:
        key = inner if inner.startswith(key) else f"{key}{joint}{inner}"
    return key


def _parser_keys(text: str) -> list[str]:
    return [key for key in _PARSER_KEY.findall(text) if key not in _CONFIG_KEYS]


def _where(text: str, args: Sequence[str]) -> str:
    """"FILE: " when the complaint is about a config file given with --config (the last one, which jsonargparse
    read last), else ""."""
    config = _config_file(args)
    if config is None or ('"config"' not in text and "config" not in text.lower()):
        return ""
    return f"{config}: "


def _config_file(args: Sequence[str]) -> Optional[str]:
    files = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("--config", "-c")]
    files += [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]
    return files[-1] if files else None


def _spelled(key: str, args: Sequence[str]) -> str:
    """`--key` when the key was given on the command line, else the key as a config file spells it."""
    return f"--{key}" if any(arg.split("=")[0] == f"--{key}" for arg in args) else key


def _full_key(keys: list[str], key: str) -> str:
    """The dotted key of a nested complaint (`model.adapter` + `adapter_lenn`)."""
    if not keys or key.startswith(keys[0]):
        return key
    return f"{keys[0]}.{key}"


def _expected(text: str) -> str:
    """What a value error says was expected (and what was given), as one short phrase."""
    got = _given(text)
    literals = list(dict.fromkeys(_LITERAL.findall(text)))  # a union of several Literals: all their values
    if literals:
        return f"expected one of {', '.join(literals)}{got}"
    problem = _CLASS_PROBLEM.search(text)
    if problem:
        return f"class_path {problem[1]!r}: {problem[2].strip()}"
    types = [name for name in _EXPECTED_TYPE.findall(text) if name != "NoneType"]
    if types:
        return f"expected {' or '.join(dict.fromkeys(types))}{got}"
    return f"{_last_line(text).rstrip('.')}{got}"


def _given(text: str) -> str:
    """", got VALUE" (the innermost value jsonargparse echoes), or ""."""
    given = _GOT.search(text) or _GIVEN.search(text)
    if not given:
        return ""
    value = given[1].strip()
    nested = re.fullmatch(r"NestedArg\(key='[^']*', val=(.*)\)", value)
    return f", got {nested[1].strip(chr(39)) if nested else value}"


def _last_line(text: str) -> str:
    """The innermost complaint: the last line that is not a value echo or a nesting header."""
    lines = [line.strip(" -") for line in text.splitlines() if line.strip(" -")]
    useful = [line for line in lines if not line.startswith(_NOISE) and not _PARSER_KEY.fullmatch(line.rstrip(":"))]
    return (useful or lines or [text])[-1]
