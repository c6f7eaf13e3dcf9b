"""The README's commands, run on stories260K and compared with what the README shows (rules: tests/readme_runs.py).

Every fenced block holding a command is either a run block (`$ COMMAND` + its output, run and compared here, after
normalising only the machine-dependent figures: seconds, tokens/s, GB) or carries `<!-- tested: tests/FILE.py -->`
naming the test that covers it; and every `--option` a README command passes exists in that command's help.
"""

from __future__ import annotations

import re

from tests.readme_runs import REPO, blocks, match, normalise, output_lines, unfenced_commands, workspace


def test_every_command_block_is_run_or_names_its_test() -> None:
    problems = []
    for block in blocks():
        if block.marker is not None:
            if not (REPO / block.marker.split("::")[0]).is_file():
                problems.append(f"README line {block.line}: the marker names {block.marker}, which does not exist")
        elif block.has_command and not block.is_run:
            problems.append(f"README line {block.line}: a command block that is neither a `$ ` run block nor "
                            "marked `<!-- tested: tests/FILE.py -->`")
    problems += [f"README line {n}: an indented command ({text!r}); put it in a fenced run or marked block"
                 for n, text in unfenced_commands()]
    assert not problems, "\n".join(problems)


def test_the_rules_catch_an_unmarked_block_and_drift() -> None:
    text = "intro\n```bash\nlit-adapter generate --prompt hi\n```\n<!-- tested: tests/test_readme.py -->\n```\n" \
           "lit-adapter chat\n```\n    pip install x\n"
    found = blocks(text)
    assert [(b.has_command, b.is_run, b.marker) for b in found] == [(True, False, None),
                                                                 (True, False, "tests/test_readme.py")]
    assert unfenced_commands(text) == [(9, "pip install x")]
    assert match(["a", "...", "took 52 s", "c"], ["a", "x", "y", "took 3.1 s", "c", ""]) is None
    assert match(["a", "b"], ["a", "c"]) is not None and match(["a"], ["a", "b"]) is not None
    assert normalise("8 tokens in 0.02 s: 359.3 tokens/s, peak memory 0.56 GB") == \
        "8 tokens in <N> s: <N> tokens/s, peak memory <N> GB"


def test_readme_run_blocks_print_what_the_readme_shows(assets, tmp_path_factory) -> None:
    space = workspace(tmp_path_factory)
    failures = []
    for block in blocks():
        if not block.is_run or block.marker is not None:
            continue
        for command, expected in block.commands:
            result = space.run(command)
            failing = any(line.startswith("error:") for line in expected)
            if (result.returncode != 0) != failing:
                failures.append(f"README line {block.line}: `{command}` exited {result.returncode}:\n"
                                f"{result.stdout[-2000:]}")
                continue
            problem = match(expected, output_lines(result))
            if problem:
                failures.append(f"README line {block.line}: `{command}`: {problem}\n--- output:\n"
                                f"{result.stdout[-2000:]}")
    assert not failures, "\n\n".join(failures)


def command_lines() -> list[tuple[int, str, list[str]]]:
    """(README line, command key for its help, its --options) of every `lit-adapter` command in a code block."""
    from lit_adapter.cli_help import SUBCOMMANDS

    found = []
    for block in blocks():
        for command in _joined(block.lines):
            words = command.split()
            if "lit-adapter" not in words or words.index("lit-adapter") + 1 >= len(words):
                continue
            rest = words[words.index("lit-adapter") + 1:]
            key = rest[0] if len(rest) < 2 or rest[1] not in SUBCOMMANDS.get(rest[0], ()) else " ".join(rest[:2])
            found.append((block.line, key, re.findall(r"(?<![\w-])--[a-z][\w.]*", command.split("#")[0])))
    return found


def _joined(lines: list[str]) -> list[str]:
    joined, current = [], ""
    for line in lines:
        current += line.removeprefix("$ ").strip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        joined.append(current)
        current = ""
    return joined


def test_every_option_a_readme_command_passes_exists() -> None:
    from lit_adapter.cli_help import stored_help

    commands = command_lines()
    assert len(commands) > 10
    problems = []
    for line, key, options in commands:
        text = stored_help(key)
        if text is None:
            problems.append(f"README line {line}: no stored help for `lit-adapter {key}`")
            continue
        problems += [f"README line {line}: `lit-adapter {key}` has no option {option}" for option in options
                     if option not in ("--help", "--version") and not re.search(re.escape(option) + r"\b", text)]
    assert not problems, "\n".join(problems)
