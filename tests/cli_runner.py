"""Many `lit-adapter` commands at the cost of one interpreter start: each runs as the console script runs it.

A batch process imports the package's heavy modules (torch, Lightning, jsonargparse) once, then forks one child per
command. The child is a fresh process for everything the command does: it calls `lit_adapter.cli.main()` with the
command's arguments in `sys.argv`, its own working folder, environment and stdin, and its stdout and stderr are
real file descriptors (1 and 2, so whatever writes there, logging handlers and C code included, is captured). An
exception escaping `main()` is printed and exits 1, as the interpreter would. What forking cannot reproduce is
output printed while the modules import; `test_cli_errors.py` runs a few rows as real subprocesses to show that
there is none.

Usage (from the tests): `run_batch(requests, workers)`; each request is a dict with argv, cwd, env, stdin, out
(a folder that receives stdout / stderr).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
PRELOADED = (
    "torch", "jsonargparse", "lightning.pytorch", "PIL.Image", "safetensors.torch", "lit_adapter.cli",
    "lit_adapter.training.cli", "lit_adapter.inference.cli", "lit_adapter.convert", "lit_adapter.adapters",
    "lit_adapter.adapters.merge", "lit_adapter.evaluation.cli", "lit_adapter.download", "open_clip",
)  # fmt: skip


def run_batch(
    requests: list[dict[str, Any]], workers: int = 3, timeout: float = 600
) -> tuple[list[int], list[float], str]:
    """Runs every request (see the module docstring); returns their exit codes and wall times, in order, and what
    the batch process itself printed on stderr while importing (a real process would print it too)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.run(
        [sys.executable, __file__, str(workers)], input=json.dumps(requests), capture_output=True, text=True,
        env=env, timeout=timeout, cwd=REPO_ROOT,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    codes, seconds = json.loads(process.stdout)
    return codes, seconds, process.stderr


def _child(request: dict[str, Any]) -> None:
    """The forked child: become the command's process, run it, exit with its status (never returns)."""
    code = 1
    try:
        out = Path(request["out"])
        stdin = out / "stdin"
        stdin.write_text(request.get("stdin") or "")
        for fd, path, flags in ((0, stdin, os.O_RDONLY), (1, out / "stdout", os.O_WRONLY | os.O_CREAT),
                                (2, out / "stderr", os.O_WRONLY | os.O_CREAT)):  # fmt: skip
            handle = os.open(path, flags, 0o644)
            os.dup2(handle, fd)
            os.close(handle)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own stdin, as at start-up
        os.chdir(request["cwd"])
        os.environ.update(request.get("env") or {})
        sys.path[:0] = request.get("pythonpath") or []  # what PYTHONPATH would add
        sys.argv = ["lit-adapter", *request["argv"]]
        from lit_adapter.cli import main

        try:
            main()
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            if not isinstance(done.code, (int, type(None))):
                print(done.code, file=sys.stderr)
        except BaseException:  # what the interpreter does with an exception nobody caught
            traceback.print_exc()
            code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _serve(workers: int) -> None:
    import importlib

    for module in PRELOADED:
        importlib.import_module(module)
    requests = json.loads(sys.stdin.read())
    codes: list[int] = [0] * len(requests)
    seconds: list[float] = [0.0] * len(requests)
    running: dict[int, tuple[int, float]] = {}  # pid -> (request index, start time)
    pending = list(range(len(requests)))
    while pending or running:
        while pending and len(running) < workers:
            index = pending.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(requests[index])
            running[pid] = index, time.monotonic()
        pid, status = os.wait()
        index, started = running.pop(pid)
        codes[index], seconds[index] = os.waitstatus_to_exitcode(status), time.monotonic() - started
    print(json.dumps([codes, seconds]))


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
