"""The README's commands as tests: parsing its code blocks, running a command as a user would, comparing the output.

A fenced block whose lines start with `$ ` is a *run block*: each `$ COMMAND` (continued by lines ending in `\\`) is
run with bash, in order, in one working folder (`configs/` linked into it), with HOME a fresh folder (so
`~/.cache/lit-adapter` is the test's cache) and `LIT_ADAPTER_ASSETS` the assets; the lines after it, up to the next
`$`, are its output (stdout and stderr together, as a terminal shows them). A line `...` stands for any number of
lines; every other line must match the next output line exactly after `normalise`.

A block can instead carry a marker on the line before its fence, `<!-- tested: tests/FILE.py -->`: it is not run
here, and FILE names the test that covers what it shows. Any other block holding a command is an error
(`command_blocks`), so a section added later must choose.

Commands are memoised per session (`run`): the demo fit runs once, and the tests that need its adapter
(`demo_adapter`) share it with the README test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = re.compile(r"^<!-- tested: (\S+?) -->$")
FENCE = re.compile(r"^```(\w*)\s*$")
# the first word of a command line (after `$ ` and VAR=value prefixes) that makes a block a command block
EXECUTABLES = ("lit-adapter", "pip", "python", "torchrun", "srun", "sbatch", "cat", "printf", "echo")
DEMO_FIT = "lit-adapter fit --config configs/demo.yaml"

# Normalisation: only figures that depend on the machine, each replaced by "<N>" in the README text and in the
# output alike: seconds ("0.52 s", "took 52 s"), throughput ("2,905 tokens/s", "359.3 tokens/s"), memory
# ("0.93 GB"), and the JSON fields "seconds", "tokens_per_sec" and "peak_memory_gb". Paths are not normalised: the
# README shows the relative ones a user sees from the folder it runs in.
_FIGURES = [
    (re.compile(r"\d[\d,]*(\.\d+)? (s|tokens/s|GB)\b"), r"<N> \2"),
    (re.compile(r'"(seconds|tokens_per_sec|peak_memory_gb)": [\d.]+'), r'"\1": <N>'),
]


def normalise(line: str) -> str:
    for pattern, replacement in _FIGURES:
        line = pattern.sub(replacement, line)
    return line.rstrip()


@dataclass
class Block:
    """A fenced code block: its first line number (1-based), language, lines and the marker before it, if any."""

    line: int
    language: str
    lines: list[str]
    marker: Optional[str] = None

    @property
    def commands(self) -> list[tuple[str, list[str]]]:
        """(command, expected output lines) of a run block, in order."""
        runs: list[tuple[str, list[str]]] = []
        lines = iter(self.lines)
        for text in lines:
            if text.startswith("$ "):
                command = text[2:]
                while command.endswith("\\"):
                    command = command[:-1].rstrip() + " " + next(lines).strip()
                runs.append((command, []))
            elif runs:
                runs[-1][1].append(text)
        return runs

    @property
    def is_run(self) -> bool:
        return any(text.startswith("$ ") for text in self.lines)

    @property
    def has_command(self) -> bool:
        return self.is_run or self.language in ("bash", "sh", "shell", "console") or any(
            _first_word(text) in EXECUTABLES for text in self.lines)


def _first_word(line: str) -> str:
    words = [w for w in line.strip().removeprefix("$ ").split() if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w)]
    return words[0] if words else ""


def blocks(text: Optional[str] = None) -> list[Block]:
    """Every fenced block of the README (or of `text`)."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        marker = MARKER.match(lines[i - 1].strip()) if i else None
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
        found.append(Block(i + 1, fence.group(1), lines[i + 1: end], marker.group(1) if marker else None))
        i = end + 1
    return found


def unfenced_commands(text: Optional[str] = None) -> list[tuple[int, str]]:
    """Commands outside fenced blocks (indented code): (line number, text); none are allowed."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    inside, found = False, []
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            inside = not inside
        elif not inside and line.startswith("    ") and _first_word(line) in EXECUTABLES:
            found.append((number, line.strip()))
    return found


def match(expected: list[str], output: list[str]) -> Optional[str]:
    """None when `output` matches `expected` (see the module docstring), else what differs first."""
    expected = [normalise(line) for line in expected]
    output = [normalise(line) for line in output]
    while output and not output[-1]:
        output.pop()
    segments = [[]]  # runs of exact lines between "..." lines
    for line in expected:
        if line == "...":
            segments.append([])
        else:
            segments[-1].append(line)
    position = 0
    for index, segment in enumerate(segments):
        first, last = index == 0, index == len(segments) - 1
        if first and segment and output[:len(segment)] != segment:
            return f"the output starts {output[:len(segment)]!r}, the README {segment!r}"
        if not segment:
            continue
        starts = [k for k in range(position, len(output) - len(segment) + 1)
                  if output[k:k + len(segment)] == segment]
        if last and len(segments) > 1:
            starts = [k for k in starts if k + len(segment) == len(output)]
        if not starts:
            return f"README lines {segment!r} are not in the output (after line {position})"
        position = starts[0] + len(segment)
    if len(segments) == 1 and position != len(output):
        return f"the output has more lines than the README shows: {output[position:position + 3]!r}"
    return None


@dataclass
class Workspace:
    """The folder README commands run in, with its HOME and environment."""

    root: Path
    results: dict[str, subprocess.CompletedProcess] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return self.root / "home"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LIT_ADAPTER_CACHE", "PYTEST"))}
        bin_dir = str(Path(sys.executable).parent)  # the environment's `lit-adapter` and `python`
        return {**env, "HOME": str(self.home), "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), "COLUMNS": "120"}

    def run(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run `command` (memoised: each command text runs once per session)."""
        if command not in self.results:
            self.results[command] = subprocess.run(
                ["bash", "-c", command], cwd=self.root, env=self.env(), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, timeout=timeout)
        return self.results[command]


_WORKSPACE: dict[str, Workspace] = {}


def workspace(tmp_path_factory) -> Workspace:
    """The session's one workspace (made on first use)."""
    if "session" not in _WORKSPACE:
        root = tmp_path_factory.mktemp("readme")
        (root / "home").mkdir()
        (root / "configs").symlink_to(REPO / "configs")
        _WORKSPACE["session"] = Workspace(root)
    return _WORKSPACE["session"]


def output_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The output as a terminal would leave it: a progress bar's carriage returns start new lines here."""
    return [line for line in re.split(r"\r\n|\r|\n", result.stdout)]


def demo_adapter(tmp_path_factory) -> tuple[Path, Path]:
    """(stories260K checkpoint folder, demo adapter folder): the README's demo fit, run once per session."""
    space = workspace(tmp_path_factory)
    result = space.run(DEMO_FIT)
    assert result.returncode == 0, result.stdout[-3000:]
    return space.home / ".cache" / "lit-adapter" / "stories260K", space.root / "out" / "demo"
