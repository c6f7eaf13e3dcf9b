"""`lit-adapter serve` as a command: `--help` is quick (no torch imported), bad options are one-line errors before
the model loads, and the real process serves with the API key from LIT_ADAPTER_API_KEY."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers import REPO_ROOT, assert_cli_error, run_cli


def test_help_is_quick_and_imports_no_torch() -> None:
    code = ("import sys, time; start = time.perf_counter(); from lit_adapter.cli import main\n"
            "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules, 'SECONDS', time.perf_counter() - start)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    for option in ("--checkpoint_dir", "--adapter", "--host", "--port", "--api_key", "--max_batch_size",
                   "--allow_image_urls"):
        assert option in result.stdout
    words = result.stdout.split()
    assert words[words.index("TORCH") + 1] == "False"
    assert float(words[words.index("SECONDS") + 1]) < 5


def test_bad_option_is_one_line(tmp_path: Path) -> None:
    result = run_cli("serve", "--checkpoint_dir", tmp_path, "--max_batch_size", "0")
    assert_cli_error(result, "--max_batch_size 0")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_served_by_the_real_command_with_the_key_from_the_environment(stories260k_dir: Path) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "LIT_ADAPTER_API_KEY": "k-env"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lit_adapter.cli", "serve", "--checkpoint_dir", str(stories260k_dir), "--port",
         str(port), "--log_level", "warning"], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.communicate(timeout=5)
            time.sleep(0.1)
        body = {"prompt": "Once upon a time", "temperature": 0, "max_tokens": 5}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 401
        answer = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer k-env"},
                            timeout=30).json()
        assert answer["model"] == stories260k_dir.name and answer["usage"]["completion_tokens"] >= 1
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert "Traceback" not in err, err
