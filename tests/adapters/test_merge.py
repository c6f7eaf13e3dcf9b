"""Merging: `lit-adapter merge` (an adapter file folded into a new checkpoint) and `merge_linears` (a loaded model
folded in place) keep the logits, and keep apart the same LoRA."""

from __future__ import annotations

import pytest
import torch

from lit_adapter.adapters import AdapterConfig, build_adapter_model, load_adapter, load_adapter_model, save_adapter
from lit_adapter.adapters.linear import AdaptedLinear
from lit_adapter.adapters.merge import merge, merge_linears, unfolded_lora
from lit_adapter.checkpoint import WEIGHTS_FILE, load_model, load_weights
from lit_adapter.cli import main
from lit_adapter.config import ModelConfig
from tests.adapters.helpers import IDS, MODES, official_v1, randomize, tiny_visual


def test_which_lora_stays_unfolded():
    """wk/wv LoRA stays apart only when there are prompts and their keys/values bypass LoRA."""
    n = 5
    bypass = dict(lora_rank=2, prompt_kv_lora=False)
    assert unfolded_lora(AdapterConfig.v2(**bypass), n) == ("wk", "wv")
    assert unfolded_lora(AdapterConfig.v2(lora_rank=2), n) == ()  # the prompts see LoRA: it folds
    assert unfolded_lora(AdapterConfig(adapter_layers=0, **bypass), n) == ()  # no prompts: nothing bypasses it
    assert unfolded_lora(AdapterConfig(adapter_layers=-5, **bypass), n) == ()  # "all but 5 layers" of 5: none
    early = AdapterConfig(adapter_layers=0, visual=tiny_visual(), **bypass)  # the visual prompts bypass it too
    assert unfolded_lora(early, n) == ("wk", "wv")
    assert unfolded_lora(AdapterConfig.v2(lora_targets=["wq", "wv"], **bypass), n) == ("wv",)
    assert unfolded_lora(AdapterConfig.v2(prompt_kv_lora=False), n) == ()  # no LoRA at all


@pytest.mark.parametrize(
    ("config", "folded", "kept"),
    [
        (AdapterConfig.v2(adapter_len=3, bias_mode="official_65b", lora_rank=2, prompt_kv_lora=False), 5 * 5,
         ("wk", "wv")),
        (AdapterConfig(adapter_layers=0, bias_mode="official_7b", lora_rank=2, prompt_kv_lora=False), 5 * 7, ()),
        (AdapterConfig.v2(adapter_len=3, lora_rank=2, lora_alpha=4.0), 5 * 7, ()),
    ],
    ids=["prompts-bypass-lora", "no-prompts", "prompts-see-lora"],
)
def test_merge_and_merge_linears_fold_the_same(stories260k_dir, tmp_path, config, folded, kept, float64_base):
    model = build_adapter_model(stories260k_dir, config)
    randomize(model, scale=0.1)
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    merge(stories260k_dir, tmp_path / "adapter", out)
    from_file = load_adapter_model(out, out if (out / "adapter.safetensors").is_file() else None)
    in_memory = load_adapter_model(stories260k_dir, tmp_path / "adapter")
    assert merge_linears(in_memory) == folded

    def lora_left(m) -> list[str]:
        modules = m.llama.named_modules()
        return sorted(n for n, module in modules if isinstance(module, AdaptedLinear) and module.lora_rank)

    expected = sorted(f"layers.{i}.attention.{name}" for i in range(5) for name in kept)
    assert lora_left(from_file) == lora_left(in_memory) == expected
    with torch.no_grad():
        reference, a, b = model.double()(IDS), from_file.double()(IDS), in_memory.double()(IDS)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (reference - b).abs().max() < 1e-5


@pytest.mark.parametrize(
    "config",
    [
        AdapterConfig.v2(adapter_len=3, lora_rank=2, lora_alpha=4.0, new_gate=True),
        AdapterConfig.v2(adapter_len=3, bias_mode="official_65b", lora_rank=2, prompt_kv_lora=False),
        AdapterConfig(adapter_layers=0, lora_rank=3, train_norms=True),  # everything folds: no adapter remains
    ],
    ids=["paper-lora", "65b-lora-prompts-bypass", "lora-only"],
)
def test_merge_cli_keeps_the_logits(stories260k_dir, tmp_path, config, float64_base):
    model = build_adapter_model(stories260k_dir, config)
    randomize(model, scale=0.1)
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    main(["merge", "--checkpoint_dir", str(stories260k_dir), "--adapter", str(tmp_path / "adapter"),
          "--out_dir", str(out)])

    assert (out / WEIGHTS_FILE).is_file() and (out / "tokenizer.model").is_file()
    load_weights(out, ModelConfig.from_name("stories260K"))  # a plain checkpoint: exactly the base keys
    remains = (out / "adapter.safetensors").is_file()
    merged = load_adapter_model(out, out if remains else None)
    merged_config = merged.adapter_config
    assert merged_config.bias_mode in ("none", "bias") and not merged_config.train_norms
    assert merged_config.lora_rank == (2 if not config.prompt_kv_lora else 0)  # wk/wv LoRA the prompts bypass
    assert remains == (config.adapter_layers != 0)
    with torch.no_grad():
        before, after = model.double()(IDS), merged.double()(IDS)
    assert (before - after).abs().max() < 1e-5


def test_merge_refuses_to_overwrite_the_base(stories260k_dir, tmp_path, capsys):
    save_adapter(build_adapter_model(stories260k_dir, MODES["v1"]), tmp_path / "adapter")
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--checkpoint_dir", str(stories260k_dir), "--adapter", str(tmp_path / "adapter"),
              "--out_dir", str(stories260k_dir)])
    assert exit_info.value.code == 2
    assert "must differ from the base checkpoint folder" in capsys.readouterr().err


def test_merge_of_an_official_file(stories260k_dir, tmp_path, float64_base):
    torch.save(official_v1(), tmp_path / "adapter.pth")
    main(["merge", "--checkpoint_dir", str(stories260k_dir), "--adapter", str(tmp_path / "adapter.pth"),
          "--out_dir", str(tmp_path / "merged"), "--adapter_len", "4"])
    before = load_adapter(load_model(stories260k_dir), tmp_path / "adapter.pth", adapter_len=4)
    after = load_adapter_model(tmp_path / "merged", tmp_path / "merged")
    assert after.adapter_config.gate_activation == "identity"
    with torch.no_grad():
        assert torch.equal(before(IDS), after(IDS))  # nothing to fold: prompts and gates move over unchanged
