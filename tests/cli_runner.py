"""Many `lit-adapter` commands at the cost of one interpreter start: each runs as the console script runs it.

A batch process imports the package's heavy modules (torch, Lightning, jsonargparse) once, then forks one child per
command. The child is a fresh process for everything the command does: it calls `lit_adapter.cli.main()` with the
command's arguments in `sys.argv`, its own working folder, environment and stdin, and its stdout and stderr are
real file descriptors (1 and 2, so whatever writes there, logging handlers and C code included, is captured). An
exception escaping `main()` is printed and exits 1, as the interpreter would. What forking cannot reproduce is
output printed while the modules import; `test_cli_errors.py` runs a few rows as real subprocesses to show that
there is none.

The batch process lasts the session: started on first use (with the first caller's environment; each request then
brings its whole environment), it takes one batch at a time. Two ways in (from the tests): `run_batch(requests,
workers)` runs a list of requests, `workers` at a time; `run_forked(requests, timeout)` runs requests together, for
tests that run commands one after another. A request is a dict with argv, cwd, env (added to the caller's
environment) or environ (the whole environment), stdin, pythonpath, out (a folder that receives stdout / stderr).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
PRELOADED = (
    "torch", "jsonargparse", "lightning.pytorch", "PIL.Image", "safetensors.torch", "lit_adapter.cli",
    "lit_adapter.training.cli", "lit_adapter.inference.cli", "lit_adapter.convert", "lit_adapter.adapters",
    "lit_adapter.adapters.merge", "lit_adapter.evaluation.cli", "lit_adapter.download", "open_clip",
)  # fmt: skip


def run_batch(
    requests: list[dict[str, Any]], workers: int = 3, timeout: float = 600
) -> tuple[list[int], list[float], str]:
    """Runs every request (see the module docstring), `workers` at a time, each with this process's environment
    plus its own `env`; returns their exit codes and wall times, in order, and what the batch process printed on
    stderr while importing (a real process would print it too)."""
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    whole = [{**request, "environ": {**base, **(request.get("env") or {})}} for request in requests]
    codes, seconds = _LASTING.run(whole, timeout, workers)
    return codes, seconds, _LASTING.preload_output


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
        if "environ" in request:
            os.environ.clear()
            os.environ.update(request["environ"])
        os.environ.update(request.get("env") or {})
        sys.path[:0] = request.get("pythonpath") or []  # what PYTHONPATH would add
        # the console script's own path, as a launcher re-running this command (Lightning's DDP) needs it
        sys.argv = [str(Path(sys.executable).with_name("lit-adapter")), *request["argv"]]
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


def _preload() -> None:
    import importlib

    for module in PRELOADED:
        importlib.import_module(module)


def _serve() -> None:
    """One batch per line on stdin, {"requests": [...], "workers": N}: each request forked, at most N running at a
    time; answers {"codes", "seconds"} when all have ended. Says {"ready": true} once the modules are imported."""
    _preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        batch = json.loads(line)
        requests, workers = batch["requests"], batch["workers"]
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
        print(json.dumps({"codes": codes, "seconds": seconds}), flush=True)


class _Lasting:
    """The session's lasting batch process (see the module docstring), in a process group of its own with every
    command it forks (and what those start), so that a command past its time is ended with all of it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process: Optional[subprocess.Popen] = None
        self.preload_output = ""

    def start(self) -> subprocess.Popen:
        if self.process is None or self.process.poll() is not None:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
            with tempfile.TemporaryFile("w+") as stderr:
                self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                                                cwd=REPO_ROOT, start_new_session=True)  # fmt: skip
                atexit.register(self.stop)
                assert self.answer(self.process, 600) == {"ready": True}, "the batch process did not start"
                stderr.seek(0)
                self.preload_output = stderr.read()
        return self.process

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def answer(self, process: subprocess.Popen, timeout: Optional[float]) -> Optional[dict]:
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        line = process.stdout.readline() if ready else None
        if ready and not line:
            raise RuntimeError("the lasting batch process ended unexpectedly")
        return json.loads(line) if line else None

    def run(self, requests: list[dict[str, Any]], timeout: float, workers: int) -> tuple[list[int], list[float]]:
        with self.lock:
            process = self.start()
            process.stdin.write(json.dumps({"requests": requests, "workers": workers}) + "\n")
            process.stdin.flush()
            done = self.answer(process, timeout)
            if done is None:
                self.stop()  # and its commands: the next call starts a new one
                raise subprocess.TimeoutExpired(requests[0]["argv"], timeout)
            return done["codes"], done["seconds"]


_LASTING = _Lasting()


def run_forked(requests: list[dict[str, Any]], timeout: float = 600) -> tuple[list[int], list[float]]:
    """Runs the requests together in the session's lasting batch process; their exit codes and wall seconds."""
    return _LASTING.run(requests, timeout, workers=len(requests))


if __name__ == "__main__":
    _serve()
