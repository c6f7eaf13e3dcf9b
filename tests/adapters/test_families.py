"""V1, V2 and LoRA on every family the model builds (Llama 3, Mistral, Qwen2, Qwen3, Falcon in both layouts): a
fresh adapter gives the base model's logits bit for bit, a few training steps change them and lower the loss, and
merging (bias/scale and LoRA folded, the base's own biases included) keeps the unmerged logits.

The tiny models are random (unit-scale weights, biases and norms away from their init values, so a layout mistake
shows); their families are the config fields tests/convert/test_families.py checks against transformers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_adapter.adapters import AdapterConfig, build_adapter_model, load_adapter_model, save_adapter
from lit_adapter.adapters.linear import AdaptedLinear
from lit_adapter.adapters.merge import merge, merge_linears
from lit_adapter.checkpoint import load_model
from lit_adapter.config import ModelConfig
from tests.adapters.helpers import randomize
from tests.helpers import family_checkpoints
from tests.training import helpers as training

LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64)
TINY = dict(vocab_size=512, n_layers=2, max_seq_len=128)
FAMILIES: dict[str, ModelConfig] = {
    "llama3": ModelConfig(**TINY, dim=64, n_heads=4, n_kv_heads=2, hidden_dim=96, rope_theta=500000.0,
                          rope_scaling=LLAMA3_ROPE, tie_embeddings=True),
    "mistral": ModelConfig(**TINY, dim=48, n_heads=6, n_kv_heads=2, hidden_dim=80, rope_theta=1e6),
    "qwen2": ModelConfig(**TINY, dim=64, n_heads=4, n_kv_heads=2, hidden_dim=80, rope_theta=1e6, norm_eps=1e-6,
                         linear_bias=["wq", "wk", "wv"]),
    "qwen3": ModelConfig(**TINY, dim=32, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=64, rope_theta=1e6,
                         qk_norm=True, tie_embeddings=True),
    "falcon-7b": ModelConfig(**TINY, dim=64, n_heads=8, n_kv_heads=1, hidden_dim=96, norm="layernorm", mlp="gelu",
                             parallel_residual=True, shared_norm=True, tie_embeddings=True),
    "falcon-40b": ModelConfig(**TINY, dim=64, n_heads=8, n_kv_heads=2, hidden_dim=96, norm="layernorm", mlp="gelu",
                              parallel_residual=True, linear_bias=["wq", "wk", "wv", "wo", "w1", "w2"]),
}
METHODS: dict[str, AdapterConfig] = {
    "v1": AdapterConfig.v1(adapter_layers=2, adapter_len=4, prompt_style="raw"),
    "v2": AdapterConfig.v2(adapter_len=4, prompt_style="raw"),  # paper: s * (Wx + b0 + b), norms, prompts
    "v2-65b": AdapterConfig.v2(adapter_len=4, bias_mode="official_65b", prompt_style="raw"),  # W (s * x) + b0 + b
    "lora": AdapterConfig(adapter_layers=0, lora_rank=4, lora_alpha=8.0, prompt_style="raw"),
    "v2-lora": AdapterConfig.v2(adapter_len=4, bias_mode="official_7b", lora_rank=2, new_gate=True,
                                prompt_kv_lora=False, prompt_style="raw"),  # wk/wv LoRA stays apart in a merge
}
TRAINED = ("v1", "v2", "lora")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Tiny models: one torch thread (see `one_torch_thread`)."""


@pytest.fixture(scope="module")
def folders(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> a checkpoint folder with random weights and the tok512 tokenizer."""
    return family_checkpoints(tmp_path_factory.mktemp("family-checkpoints"), assets, FAMILIES)


def token_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (2, 13), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapter_is_the_base_model_bit_for_bit(family: str, method: str, folders) -> None:
    base = load_model(folders[family])
    model = build_adapter_model(folders[family], METHODS[method]).eval()
    if FAMILIES[family].linear_bias and METHODS[method].bias_mode != "none":  # b: an addition to the base's b0
        assert any(m.base_bias is not None and m.bias is not None for m in model.modules()
                   if isinstance(m, AdaptedLinear))
    with torch.no_grad():
        assert torch.equal(model(token_ids()), base(token_ids()))


def mean_loss(lit, batches: list) -> float:
    with torch.no_grad():
        sums = [lit.loss_sums(batch) for batch in batches]
    return float(sum(total for total, _ in sums) / sum(count for _, count in sums))


@pytest.mark.parametrize("method", TRAINED)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_training_steps_change_the_output_and_lower_the_loss(family: str, method: str, folders, instructions,
                                                                    tmp_path: Path) -> None:
    lit = training.LitAdapterModule(checkpoint_dir=str(folders[family]), adapter=METHODS[method],
                                    learning_rate=2e-2, weight_decay=0.0, warmup_steps=0)
    lit.configure_model()
    data = training.joint_data(lit, instructions, captions=False)
    data.prepare_data()
    data.setup("fit")
    batches = list(data.parts["instruction"].train_dataloader())
    with torch.no_grad():
        before_logits = lit.model.eval()(token_ids())
    before = mean_loss(lit, batches)
    training.trainer(tmp_path, max_steps=10).fit(lit, datamodule=data)
    lit.model.eval()
    after = mean_loss(lit, batches)
    with torch.no_grad():
        change = float((lit.model(token_ids()) - before_logits).abs().max())
    print(f"{family} {method}: training loss {before:.4f} -> {after:.4f}, max |logits change| {change:.3f}")
    assert change > 1e-3 and after < before


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_keeps_the_unmerged_logits(family: str, method: str, folders, tmp_path: Path) -> None:
    folder = folders[family]
    model = build_adapter_model(folder, METHODS[method]).eval()
    randomize(model, seed=1, scale=0.1)
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    merge(folder, tmp_path / "adapter", out)
    from_file = load_adapter_model(out, out if (out / "adapter.safetensors").is_file() else None)
    in_memory = load_adapter_model(folder, tmp_path / "adapter")
    folded = merge_linears(in_memory)
    assert folded > 0 or method == "v1"
    with torch.no_grad():
        reference = model.double()(token_ids())
        diffs = [float((m.double()(token_ids()) - reference).abs().max()) for m in (from_file, in_memory)]
    print(f"{family} {method}: {folded} linears folded; max |logits diff| file {diffs[0]:.2e}, "
          f"in memory {diffs[1]:.2e} (logits up to {float(reference.abs().max()):.1f})")
    assert max(diffs) < 1e-4


@pytest.mark.parametrize("family", ["qwen2", "falcon-40b"])
def test_merge_writes_the_base_bias_scaled_and_keeps_the_adapter_bias(family: str, folders, tmp_path: Path) -> None:
    """Paper form y = s * (Wx + b0 + b): the merged base holds s * b0 where the base had b0, the adapter s * b."""
    from lit_adapter.adapters.formats import read_adapter
    from lit_adapter.checkpoint import load_config, load_weights

    folder = folders[family]
    model = build_adapter_model(folder, METHODS["v2"])
    randomize(model, seed=2, scale=0.1)
    save_adapter(model, tmp_path / "adapter")
    merge(folder, tmp_path / "adapter", tmp_path / "merged")
    base = load_weights(folder, load_config(folder))
    merged = load_weights(tmp_path / "merged", load_config(tmp_path / "merged"))
    left = read_adapter(tmp_path / "merged", load_config(tmp_path / "merged")).tensors
    wq = model.llama.layers[1].attention.wq
    scale, bias = wq.scale.detach().double(), wq.bias.detach().double()
    b0 = base["layers.1.attention.wq.bias"].double()
    torch.testing.assert_close(merged["layers.1.attention.wq.bias"].double(), scale * b0)
    torch.testing.assert_close(left["llama.layers.1.attention.wq.bias"].double(), scale * bias)


def test_base_weights_load_by_name_into_an_adapted_model(folders) -> None:
    """FSDP copies the base weights in by parameter name after the adapters are attached: the base's own bias is
    then `base_bias` (the adapter's is `bias`), and every file key lands on the parameter holding that weight."""
    from safetensors import safe_open

    from lit_adapter.adapters.linear import base_bias_keys
    from lit_adapter.checkpoint import WEIGHTS_FILE
    from lit_adapter.training.fsdp import PrefixedTensors

    model = build_adapter_model(folders["qwen2"], METHODS["v2"])
    params = dict(model.named_parameters())
    with safe_open(str(folders["qwen2"] / WEIGHTS_FILE), framework="pt", device="cpu") as f:
        tensors = PrefixedTensors(f, "llama.", base_bias_keys(model))
        names = tensors.keys()
        assert "llama.layers.0.attention.wq.base_bias" in names and "llama.layers.0.attention.wq.bias" not in names
        assert tensors.file_key("llama.layers.0.attention.wq.base_bias") == "layers.0.attention.wq.bias"
        for name in names:
            assert name in params, name
            assert torch.equal(tensors[name], params[name].detach()), name  # the model was built from this file
            assert name not in model.adapter_names or name.endswith("norm.weight"), name  # norms start as the base's
