"""More than one machine: two `lit-adapter fit` processes launched as two nodes of one CPU device each (NODE_RANK 0/1,
MASTER_ADDR/MASTER_PORT, gloo) train exactly the adapter that one node with two devices trains."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers import run_cli_together
from tests.training import helpers
from tests.training.test_distributed import clip_weights, ddp_run, init_adapter, two_process_config  # noqa: F401


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_nodes(config: Path, num_nodes: int, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """`lit-adapter fit --config CONFIG --trainer.num_nodes N --trainer.devices 1` once per node, as a cluster's
    launcher starts it on each machine (here all on this one, talking over 127.0.0.1)."""
    port = str(free_port())
    command = ["fit", "--config", str(config), "--trainer.num_nodes", str(num_nodes), "--trainer.devices", "1"]
    envs = [{"NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port} for node in range(num_nodes)]
    return run_cli_together([command] * num_nodes, envs, timeout=timeout)


def test_two_nodes_of_one_device_train_what_one_node_of_two_devices_trains(
    ddp_run: Path, stories260k_dir: Path, instructions: Path, init_adapter: Path, tmp_path: Path  # noqa: F811
) -> None:
    saver = {"class_path": "tests.training.helpers.SaveRankState", "init_args": {"folder": str(tmp_path)}}
    # the configuration of the two-device run (ddp_run), only launched as two nodes of one device each
    config = two_process_config(tmp_path / "run", stories260k_dir, instructions, init_adapter,
                                strategy="ddp_find_unused_parameters_true", callbacks=[saver])  # fmt: skip
    nodes = launch_nodes(helpers.write_config(tmp_path / "nodes.yaml", config), num_nodes=2)
    for node, result in enumerate(nodes):
        assert result.returncode == 0, (node, result.stderr[-3000:])
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in nodes[1].stdout + nodes[1].stderr
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in nodes[0].stdout + nodes[0].stderr

    two_nodes = load_file(tmp_path / "run" / "adapter.safetensors")  # written by global rank 0 (node 0)
    two_devices = load_file(ddp_run / "run" / "adapter.safetensors")
    assert two_nodes.keys() == two_devices.keys() and two_nodes
    for name, tensor in two_devices.items():
        assert torch.equal(two_nodes[name], tensor), name
    for rank in range(2):  # and each process ends where the same rank of the two-device run does
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        expected = torch.load(ddp_run / f"rank{rank}.pt", weights_only=True)
        assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
