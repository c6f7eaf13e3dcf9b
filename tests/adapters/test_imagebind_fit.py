"""ImageBind-LLM pre-training on CPU through `lit-adapter fit`: a tiny ImageBind encoder, stories260K, image-caption
data; the bind network, gates and prompts move, everything else stays; the exported adapter loads and sees images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lit_adapter.adapters import load_adapter_model
from lit_adapter.checkpoint import load_yaml
from lit_adapter.training.cli import fit_main
from tests.encoders.helpers import save_tiny_imagebind

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pretrain_then_finetune_recipes_in_miniature(stories260k_dir, tmp_path, instructions):
    recipe = yaml.safe_load((REPO / "configs" / "imagebind_pretrain.yaml").read_text())
    encoder = save_tiny_imagebind(tmp_path / "imagebind_w3D.pth")
    root = tmp_path / "run"
    adapter = {**recipe["model"]["adapter"], "adapter_layers": 5, "lora_rank": 2, "prompt_style": "raw"}
    adapter["visual"] = {**adapter["visual"], "encoder_weights": str(encoder)}
    config = {
        "seed_everything": 7,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 3,
                    "default_root_dir": str(root), "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0, "limit_val_batches": 0, "log_every_n_steps": 1},
        "model": {**recipe["model"], "checkpoint_dir": str(stories260k_dir), "adapter": adapter,
                  "learning_rate": 0.01, "warmup_epochs": None, "warmup_steps": 1},
        "data": {"caption": {"class_path": "lit_adapter.data.caption.CaptionDataModule",
                             "init_args": {"data_path": "builtin:demo", "max_seq_length": 48, "batch_size": 2}}},
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    fit_main(["--config", str(tmp_path / "config.yaml")])
    trained = load_file(root / "adapter.safetensors")
    assert not any(name.startswith("visual.clip.") for name in trained)  # the frozen encoder is not saved
    gates = [t for name, t in trained.items() if name.endswith(".adaption_prompt.gate")]
    assert len(gates) == 5 and all(gate.abs().sum() > 0 for gate in gates)  # the zero-init gates moved
    # phase 1 trains the bind network, gates and prompts; bias and LoRA l2 stay at zero
    assert all(t.abs().sum() == 0 for name, t in trained.items() if name.endswith((".bias", ".lora_l2"))
               and name.startswith("llama."))
    assert load_yaml(root / "adapter_config.yaml")["visual"]["encoder"] == "imagebind"
    model = load_adapter_model(stories260k_dir, root)
    torch.testing.assert_close(model.visual.bind.proj.weight, trained["visual.bind.proj.weight"])
    with torch.no_grad():
        tokens = model.encode_images(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 1, 64) and torch.isfinite(tokens).all()
    # phase 2 (the finetune recipe): from the phase-1 adapter, only biases, norms and LoRA move
    recipe = yaml.safe_load((REPO / "configs" / "imagebind_finetune.yaml").read_text())
    tuned_root = tmp_path / "finetune"
    config["trainer"]["default_root_dir"] = str(tuned_root)
    config["model"] = {**recipe["model"], "checkpoint_dir": str(stories260k_dir), "adapter": adapter,
                       "init_adapter": str(root), "learning_rate": 0.01, "warmup_epochs": None, "warmup_steps": 1}
    config["data"] = {"instruction": {"class_path": "lit_adapter.data.instruction.InstructionDataModule",
                                      "init_args": {"data_path": str(instructions), "max_seq_length": 32,
                                                    "batch_size": 2, "val_split": 2}}}
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(config))
    fit_main(["--config", str(tmp_path / "finetune.yaml")])
    tuned = load_file(tuned_root / "adapter.safetensors")
    assert tuned.keys() == trained.keys()
    moved = {name for name in tuned if not torch.equal(tuned[name], trained[name])}
    assert moved and all(name.endswith((".bias", "norm.weight", ".lora_l1", ".lora_l2")) and name.startswith("llama.")
                         for name in moved)
    assert any(name.endswith(".lora_l2") for name in moved) and any(name.endswith(".bias") for name in moved)
