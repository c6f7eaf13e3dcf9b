"""`lit-adapter fit` / `validate`: every shipped config parses; the demo config runs end to end (a few steps)."""

from __future__ import annotations

import csv
import json
import runpy
import sys
from pathlib import Path
from typing import Optional

import pytest
import yaml
from safetensors.torch import load_file

from lit_adapter.adapters import AdapterConfig
from lit_adapter.checkpoint import load_yaml
from lit_adapter.cli import main
from lit_adapter.inference.engine import Engine
from lit_adapter.prompts import ALPACA, CHAT
from lit_adapter.training.cli import AdapterCLI, fit_main, validate_main
from tests.training.helpers import REPO, WORDS, write_config

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_the_expected_configs_ship() -> None:
    names = {path.stem for path in CONFIGS}
    assert {"demo", "llama7b_v1_alpaca", "llama7b_v2_joint", "llama7b_v2_official_pretrain",
            "llama7b_v2_official_finetune", "llama13b_v2_fsdp", "llama65b_v2_fsdp"} <= names  # fmt: skip


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_parses(path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        AdapterCLI(args=["fit", "--config", str(path), "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(path.read_text())
    assert printed["model"]["checkpoint_dir"] == written["model"]["checkpoint_dir"]
    assert printed["trainer"]["precision"] == written["trainer"]["precision"]
    for key in ("learning_rate", "weight_decay"):
        assert printed["model"][key] == pytest.approx(written["model"][key])
    assert printed["model"]["adapter"]["bias_mode"] == written["model"]["adapter"].get("bias_mode", "none")


def test_recipe_values_of_the_v1_config() -> None:
    config = yaml.safe_load((REPO / "configs" / "llama7b_v1_alpaca.yaml").read_text())
    trainer, model = config["trainer"], config["model"]
    data = config["data"]["instruction"]["init_args"]
    effective_batch = trainer["devices"] * data["batch_size"] * trainer.get("accumulate_grad_batches", 1)
    assert effective_batch == 32
    assert model["learning_rate"] == pytest.approx(9e-3 * effective_batch / 256)
    assert (trainer["max_epochs"], model["warmup_epochs"], model["weight_decay"]) == (5, 2, 0.02)
    assert model["betas"] == [0.9, 0.95] and data["max_seq_length"] == 512 and trainer["precision"] == "bf16-true"


def test_demo_config_runs_exports_logs_and_validates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "demo"
    overrides = [
        "--config", str(REPO / "configs" / "demo.yaml"), "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "1", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar",
        "false", "--checkpoint.every_n_train_steps", "1", "--data.instruction.init_args.batch_size", "2",
        "--data.caption.init_args.batch_size", "2",
    ]  # fmt: skip
    fit_main(overrides)
    out = capsys.readouterr().out
    assert "validation loss before training:" in out
    summary = out[out.index("training summary"):]
    assert "trainable parameters:" in summary and "tokens/s" in summary and "peak memory:" in summary
    assert f"adapter: {root}" in summary
    for name in ("adapter.safetensors", "adapter_config.yaml", "tokenizer.model", "model_config.yaml", "training.yaml"):
        assert (root / name).is_file(), name
    adapter = load_file(root / "adapter.safetensors")
    assert any(name.startswith("visual.") for name in adapter) and any(".adaption_prompt.gate" in n for n in adapter)
    assert (root / "checkpoints" / "last.ckpt").is_file()
    metrics = list(csv.DictReader(open(next((root / "logs").glob("version_*/metrics.csv")))))
    columns = set(metrics[0])
    assert {"train_loss", "lr", "tokens_per_sec", "peak_memory_gb", "val_loss"} <= columns
    assert list((root / "tensorboard").glob("version_*/events.out.tfevents.*"))

    last = root / "checkpoints" / "last.ckpt"
    validate_main(overrides[:4] + ["--trainer.limit_val_batches", "1", "--ckpt_path", str(last)])
    assert "val_loss" in capsys.readouterr().out


def test_user_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--model.checkpoint_dir", str(tmp_path / "nope"),
              "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "nope" in err[-1] and "checkpoint folder not found" in err[-1]


@pytest.mark.parametrize("script", ["adapter_v1", "adapter_v2", "demo"])
def test_finetune_recipes_run_the_cli_with_their_config(
    script: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(sys, "argv", [script, "--print_config"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "finetune" / f"{script}.py"), run_name="__main__")
    assert done.value.code == 0
    config = {"adapter_v1": "llama7b_v1_alpaca", "adapter_v2": "llama7b_v2_joint", "demo": "demo"}[script]
    written = yaml.safe_load((REPO / "configs" / f"{config}.yaml").read_text())
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["default_root_dir"] == written["trainer"]["default_root_dir"]


def conversations(path: Path, count: int = 12) -> Path:
    """Short two-turn ShareGPT-style conversations (written in the chat template)."""
    records = [
        {"conversations": [
            {"from": "human", "value": f"Who is {name}?"}, {"from": "gpt", "value": f"{name} is a {kind}."},
            {"from": "human", "value": "What does it like?"}, {"from": "gpt", "value": f"It likes the {thing}."},
        ]}
        for name, kind, thing in zip(["Tim", "Sue", "Ben", "Mia"] * 3, ["boy", "girl"] * 6, WORDS, strict=False)
    ][:count]  # fmt: skip
    path.write_text(json.dumps(records))
    return path


def chat_fit_config(root: Path, checkpoint_dir: Path, data: Path, prompt_style: Optional[str]) -> dict:
    adapter = AdapterConfig.v1(adapter_len=4, adapter_layers=2).to_dict()
    if prompt_style is not None:
        adapter["prompt_style"] = prompt_style
    else:
        del adapter["prompt_style"]  # the default, alpaca
    return {
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 2,
                    "default_root_dir": str(root), "enable_progress_bar": False, "num_sanity_val_steps": 0,
                    "limit_val_batches": 0, "logger": False},
        "model": {"checkpoint_dir": str(checkpoint_dir), "adapter": adapter, "warmup_steps": 0},
        "data": {"instruction": {"class_path": "lit_adapter.data.instruction.InstructionDataModule",
                                 "init_args": {"data_path": str(data), "max_seq_length": 256, "batch_size": 4,
                                               "val_split": 0}}},
    }  # fmt: skip


def test_fit_on_chat_data_writes_the_chat_style_and_generate_uses_it(
    stories260k_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The prompt style is set once (model.adapter.prompt_style), handed to the data, written into
    adapter_config.yaml, and `lit-adapter generate` formats its prompt with it."""
    root, data = tmp_path / "run", conversations(tmp_path / "chats.json")
    config = write_config(tmp_path / "chat.yaml", chat_fit_config(root, stories260k_dir, data, "chat"))
    fit_main(["--config", str(config)])
    assert load_yaml(root / "adapter_config.yaml")["prompt_style"] == "chat"
    capsys.readouterr()

    prompt = "Who is Tim?"
    main(["generate", "--checkpoint_dir", str(stories260k_dir), "--adapter", str(root), "--prompt", prompt,
          "--max_new_tokens", "2", "--json", "--device", "cpu", "--precision", "32-true"])  # fmt: skip
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    engine = Engine.load(stories260k_dir, root, device="cpu", precision="32-true")
    assert engine.style.name == "chat"
    chat_ids, alpaca_ids = engine.encode(CHAT.apply(prompt)), engine.encode(ALPACA.apply(prompt))
    assert record["prompt_tokens"] == chat_ids.numel() != alpaca_ids.numel()


def test_chat_data_under_another_style_and_a_second_style_setting_are_refused(
    stories260k_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = conversations(tmp_path / "chats.json")
    config = write_config(tmp_path / "alpaca.yaml", chat_fit_config(tmp_path / "a", stories260k_dir, data, None))
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config)])
    assert done.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "record 0: a conversation takes the chat style, but the prompt style is 'alpaca'" in error
    assert "model.adapter.prompt_style: chat" in error and not (tmp_path / "a" / "adapter_config.yaml").exists()

    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--data.instruction.init_args.prompt_style", "chat"])
    assert done.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "data.instruction.prompt_style is set, but it comes from the model (model.adapter.prompt_style)" in error
