"""Adapter files: our format round trip, wrong-base errors, the official V1/V2/LoRA/65B formats, merging."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from lit_adapter.adapters import AdapterConfig, build_adapter_model, load_adapter_model
from lit_adapter.adapters.io import load_adapter, save_adapter
from lit_adapter.adapters.visual import VisualAdapter
from lit_adapter.checkpoint import WEIGHTS_FILE, load_model, load_weights
from lit_adapter.cli import main
from lit_adapter.config import ModelConfig
from lit_adapter.errors import LitAdapterError
from lit_adapter.model import LLaMA
from tests.adapters.helpers import IDS, MODES, images, randomize, tiny_visual
from tests.adapters.reference import Adapter, reference_logits

DIM, LAYERS, HEADS, KV_DIM, HIDDEN = 64, 5, 8, 32, 172  # stories260K
ATTENTION = {"wq": (DIM, DIM), "wk": (KV_DIM, DIM), "wv": (KV_DIM, DIM), "wo": (DIM, DIM)}  # [out, in]
FFN = {"w1": (HIDDEN, DIM), "w2": (DIM, HIDDEN), "w3": (HIDDEN, DIM)}


@pytest.fixture
def clip_weights(tmp_path) -> str:
    """A fixed tiny CLIP tower saved to a file, so every model built from the config gets the same frozen tower."""
    torch.manual_seed(7)
    tower = VisualAdapter(tiny_visual(), DIM).clip.visual
    path = tmp_path / "tiny_clip.pt"
    torch.save(tower.state_dict(), path)
    return str(path)


GENERATOR = torch.Generator().manual_seed(0)


def rand(*shape, scale: float = 0.2) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=GENERATOR)


def one_line_error(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


# ---------------------------------------------------------------------------------------------------- our format


def test_round_trip_restores_the_model_exactly(stories260k_dir, tmp_path, clip_weights):
    config = AdapterConfig.v2(adapter_len=3, lora_rank=2, new_gate=True, visual=tiny_visual(
        clip_pretrained=clip_weights), visual_layers=2, prompt_style="chat")
    model = build_adapter_model(load_model(stories260k_dir), config)
    randomize(model)
    pics = images()
    expected = model(IDS, images=pics)
    save_adapter(model, tmp_path / "adapter")

    with safe_open(str(tmp_path / "adapter" / "adapter.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(model.adapter_names)  # the adapter's own tensors only: no base, no CLIP tower
    header = yaml.safe_load((tmp_path / "adapter" / "adapter_config.yaml").read_text())
    base = ModelConfig.from_name("stories260K")
    assert header["base_model"] == {"name": "stories260K", "architecture_hash": base.architecture_hash()}
    assert header["prompt_style"] == "chat" and header["bias_mode"] == "paper"

    loaded, loaded_config = load_adapter_model(stories260k_dir, tmp_path / "adapter")
    assert loaded_config == config
    assert torch.equal(loaded(IDS, images=pics), expected)
    # the .safetensors path works too, and so does loading onto an AdapterModel built with the same config
    again = load_adapter(build_adapter_model(load_model(stories260k_dir), config),
                         tmp_path / "adapter" / "adapter.safetensors")
    assert torch.equal(again(IDS, images=pics), expected)


def test_adapter_for_another_base_model_fails_with_one_line(stories260k, tmp_path):
    save_adapter(build_adapter_model(stories260k, MODES["v1"]), tmp_path / "adapter")
    other = LLaMA(ModelConfig.from_name("tiny", n_layers=5))
    with pytest.raises(LitAdapterError) as err:
        load_adapter(other, tmp_path / "adapter")
    one_line_error(err, "adapter_config.yaml", "made for base model 'stories260K'")


def test_wrong_shape_with_a_matching_hash_names_the_key(stories260k, tmp_path):
    model = build_adapter_model(stories260k, MODES["v1"])
    save_adapter(model, tmp_path / "adapter")
    tensors = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    tensors["llama.layers.3.attention.adaption_prompt.prompt"] = torch.zeros(5, DIM)
    save_file(tensors, str(tmp_path / "adapter" / "adapter.safetensors"))
    with pytest.raises(LitAdapterError) as err:
        load_adapter(LLaMA(stories260k.config), tmp_path / "adapter")
    key = "'llama.layers.3.attention.adaption_prompt.prompt'"
    one_line_error(err, "adapter.safetensors", key, "[5, 64]", "[4, 64]")


def test_an_adapter_model_with_another_config_is_refused(stories260k, tmp_path):
    save_adapter(build_adapter_model(load_model_like(stories260k), MODES["v2-paper"]), tmp_path / "adapter")
    with pytest.raises(LitAdapterError) as err:
        load_adapter(build_adapter_model(stories260k, MODES["v2-official_65b"]), tmp_path / "adapter")
    one_line_error(err, "bias_mode is 'paper'", "'official_65b'")


def load_model_like(model: LLaMA) -> LLaMA:
    copy = LLaMA(model.config)
    copy.load_state_dict(model.state_dict())
    return copy


def test_missing_adapter_file(tmp_path, stories260k):
    with pytest.raises(LitAdapterError) as err:
        load_adapter(stories260k, tmp_path)
    one_line_error(err, "no adapter.safetensors")


# ---------------------------------------------------------------------------------------------- official formats


def meta_weights(model: LLaMA) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def official_v1(gate_shape=(1, HEADS, 1, 1)) -> dict[str, torch.Tensor]:
    state = {"adapter_query.weight": rand(3 * 4, DIM, scale=1.0)}  # L=3 layers x K=4 tokens
    state |= {f"layers.{i}.attention.gate": rand(*gate_shape, scale=1.0) for i in range(LAYERS)}
    return state


@pytest.mark.parametrize("gate_shape", [(1, HEADS, 1, 1), (1,)])
def test_official_v1_file_computes_the_official_formula(stories260k, tmp_path, gate_shape, float64_base):
    state = official_v1(gate_shape)
    torch.save(state, tmp_path / "adapter.pth")
    weights = meta_weights(stories260k)
    model = load_adapter(stories260k, tmp_path / "adapter.pth", adapter_len=4).double()
    assert model.adapter_config.gate_activation == "identity" and model.adapter_config.adapter_layers == 3
    # official inference: prompt[j] = adapter_query rows [jK, (j+1)K) for layer N-L+j; output += gate * softmax(..) V
    query = state["adapter_query.weight"].double()
    reference = Adapter(
        prompts={2 + j: query[4 * j: 4 * (j + 1)] for j in range(3)},
        gates={i: state[f"layers.{i}.attention.gate"].double().reshape(-1, 1, 1)[None].expand(1, HEADS, 1, 1)
               for i in range(LAYERS)},
        activation=lambda gate: gate,
    )
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference_logits(weights, model.config, IDS, reference), atol=1e-6,
                                   rtol=0)


def official_visual(clip_weights: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    visual = VisualAdapter(tiny_visual(clip_pretrained=clip_weights), DIM, load_clip=False)
    with torch.no_grad():
        for param in visual.parameters():
            param.add_(rand(*param.shape))
    return {name: param.detach().clone() for name, param in visual.named_parameters()}


def official_v2(clip_weights: str, lora: bool) -> dict:
    """BIAS-7B (or LORA-BIAS-7B) layout at stories260K size: query_len 3 (= visual_len) x query_layer 4."""
    sd = official_visual(clip_weights)
    sd["adapter_query.weight"] = rand(4 * 3, DIM, scale=1.0)
    for i in range(LAYERS):
        p = f"llama.layers.{i}."
        sd[p + "attention.gate"] = rand(1, HEADS, 1, 1, scale=1.0)
        sd |= {p + f"attention.{n}.bias": rand(ATTENTION[n][0]) for n in ("wq", "wo")}
        sd |= {p + f"feed_forward.{n}.bias": rand(FFN[n][0]) for n in FFN}
        sd |= {p + f"{n}.weight": 1 + rand(DIM) for n in ("attention_norm", "ffn_norm")}
        if lora:
            for parent, shapes in (("attention", ATTENTION), ("feed_forward", FFN)):
                for n, (out, inp) in shapes.items():
                    sd[p + f"{parent}.lora_{n}_l1.weight"] = rand(2, inp, scale=0.3)
                    sd[p + f"{parent}.lora_{n}_l2.weight"] = rand(out, 2, scale=0.3)
            sd[p + "attention.new_gate"] = 1 + rand(1, 1, 1, 1)
    sd["llama.norm.weight"] = 1 + rand(DIM)
    return {"model": sd, "config": {"w_bias": True, "w_lora": lora, "lora_rank": 2}}


def official_v2_linear(sd: dict, with_lora: bool):
    """Official V2: wq/wo/w1/w2/w3 have a bias (y = Wx + b); LoRA adds lora_l2(lora_l1(x)) to wq..w3."""
    def linear(i: int, name: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        parent = "attention" if name in ATTENTION else "feed_forward"
        p = f"llama.layers.{i}.{parent}."
        y = x @ weight.T
        if p + f"{name}.bias" in sd:
            y = y + sd[p + f"{name}.bias"].double()
        if with_lora and p + f"lora_{name}_l1.weight" in sd:
            y = y + (x @ sd[p + f"lora_{name}_l1.weight"].double().T) @ sd[p + f"lora_{name}_l2.weight"].double().T
        return y

    return linear


@pytest.mark.parametrize("lora", [False, True])
def test_official_v2_file_computes_the_official_formula(stories260k, tmp_path, clip_weights, lora, float64_base):
    checkpoint = official_v2(clip_weights, lora)
    sd = checkpoint["model"]
    torch.save(checkpoint, tmp_path / "BIAS-7B.pth")
    weights = meta_weights(stories260k)
    visual_config = tiny_visual(clip_pretrained=clip_weights)
    model = load_adapter(stories260k, tmp_path / "BIAS-7B.pth", visual=visual_config)
    config = model.adapter_config
    assert (config.fusion, config.bias_mode, config.adapter_layers, config.lora_rank) == ("late", "official_7b", 4,
                                                                                          2 if lora else 0)
    # the visual adapter holds the official visual_* / clip_proj* tensors under the same names
    official = VisualAdapter(visual_config, DIM)
    official.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("llama.", "adapter_query"))},
                             strict=False)
    pics = images()
    with torch.no_grad():
        visual_tokens = official(pics).double()
        torch.testing.assert_close(model.encode_images(pics).double(), visual_tokens)
    model = model.double()
    # official: layer 1 + j gets adapter_query block j + the visual query; gate.tanh(); new_gate; wk(adapter) no LoRA
    query = sd["adapter_query.weight"].double()
    reference = Adapter(
        prompts={1 + j: query[3 * j: 3 * (j + 1)] for j in range(4)},
        gates={i: sd[f"llama.layers.{i}.attention.gate"].double() for i in range(LAYERS)},
        late_visual=visual_tokens,
        new_gates={i: sd[f"llama.layers.{i}.attention.new_gate"].double() for i in range(LAYERS)} if lora else {},
        linear=official_v2_linear(sd, with_lora=True),
        prompt_linear=official_v2_linear(sd, with_lora=False),
        norms={k.removeprefix("llama."): v.double() for k, v in sd.items() if k.endswith("norm.weight")},
    )
    with torch.no_grad():
        logits = model(IDS, visual_tokens=visual_tokens)
        torch.testing.assert_close(logits, reference_logits(weights, model.config, IDS, reference), atol=1e-6, rtol=0)


@pytest.mark.parametrize("with_prompts", [False, True])
def test_official_65b_file_computes_the_official_formula(stories260k, tmp_path, with_prompts, float64_base):
    sd = {}
    for i in range(LAYERS):
        for parent, shapes in (("attention", ATTENTION), ("feed_forward", FFN)):
            for n, (out, inp) in shapes.items():
                sd[f"layers.{i}.{parent}.{n}_bias"] = rand(out)
                sd[f"layers.{i}.{parent}.{n}_scale"] = 1 + rand(inp)
        sd |= {f"layers.{i}.{n}.weight": 1 + rand(DIM) for n in ("attention_norm", "ffn_norm")}
    sd["norm.weight"] = 1 + rand(DIM)
    if with_prompts:  # adapter_len 5 on the top 2 layers; gates exist only there
        sd["adapter_query.weight"] = rand(2 * 5, DIM, scale=1.0)
        sd |= {f"layers.{i}.attention.gate": rand(1, HEADS, 1, 1, scale=1.0) for i in (3, 4)}
    torch.save({"model": sd}, tmp_path / "chat65b.pth")
    weights = meta_weights(stories260k)
    model = load_adapter(stories260k, tmp_path / "chat65b.pth").double()
    assert model.adapter_config.bias_mode == "official_65b" and model.adapter_config.train_norms

    def linear(i, name, x, weight):  # forward_linear_with_scale_and_bias: y = W (s * x) + b
        parent = "attention" if name in ATTENTION else "feed_forward"
        scale, bias = sd[f"layers.{i}.{parent}.{name}_scale"].double(), sd[f"layers.{i}.{parent}.{name}_bias"].double()
        return (x * scale) @ weight.T + bias

    reference = Adapter(linear=linear, norms={k: v.double() for k, v in sd.items() if k.endswith("norm.weight")})
    if with_prompts:
        query = sd["adapter_query.weight"].double()
        reference.prompts = {3: query[:5], 4: query[5:]}
        reference.gates = {i: sd[f"layers.{i}.attention.gate"].double() for i in (3, 4)}
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference_logits(weights, model.config, IDS, reference), atol=1e-6,
                                   rtol=0)


def test_official_files_for_another_base_or_with_unknown_keys_fail_with_one_line(stories260k, tmp_path):
    state = official_v1()
    state["adapter_query.weight"] = torch.zeros(12, 32)
    torch.save(state, tmp_path / "wrong_dim.pth")
    with pytest.raises(LitAdapterError) as err:
        load_adapter(stories260k, tmp_path / "wrong_dim.pth", adapter_len=4)
    one_line_error(err, "wrong_dim.pth", "'adapter_query.weight'", "[12, 32]")

    state = official_v1()
    state["layers.9.attention.gate"] = torch.zeros(1, HEADS, 1, 1)
    torch.save(state, tmp_path / "deeper.pth")
    with pytest.raises(LitAdapterError) as err:
        load_adapter(stories260k, tmp_path / "deeper.pth", adapter_len=4)
    one_line_error(err, "deeper.pth", "'layers.9.attention.gate'", "layer 9 does not exist")

    state = official_v1()
    state["layers.2.attention.gate"] = torch.zeros(1, 32, 1, 1)  # a 7B gate
    torch.save(state, tmp_path / "heads.pth")
    with pytest.raises(LitAdapterError) as err:
        load_adapter(stories260k, tmp_path / "heads.pth", adapter_len=4)
    one_line_error(err, "heads.pth", "'layers.2.attention.gate'", "[1, 32, 1, 1]")

    checkpoint = {"model": {"llama.layers.0.attention.wk.bias": torch.zeros(KV_DIM)}, "config": {}}
    torch.save(checkpoint, tmp_path / "odd.pth")
    with pytest.raises(LitAdapterError) as err:
        load_adapter(stories260k, tmp_path / "odd.pth")
    one_line_error(err, "odd.pth", "'llama.layers.0.attention.wk.bias'", "unexpected")

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(LitAdapterError) as err:
        load_adapter(stories260k, tmp_path / "garbage.pth")
    one_line_error(err, "garbage.pth", "cannot read")


# --------------------------------------------------------------------------------------------------------- merge


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
    model = build_adapter_model(load_model(stories260k_dir), config)
    randomize(model, scale=0.1)
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    main(["merge", "--checkpoint_dir", str(stories260k_dir), "--adapter", str(tmp_path / "adapter"),
          "--out_dir", str(out)])

    assert (out / WEIGHTS_FILE).is_file() and (out / "tokenizer.model").is_file()
    load_weights(out, ModelConfig.from_name("stories260K"))  # a plain checkpoint: exactly the base keys
    remains = (out / "adapter.safetensors").is_file()
    merged, merged_config = load_adapter_model(out, out if remains else None)
    assert merged_config.bias_mode in ("none", "bias") and not merged_config.train_norms
    assert merged_config.lora_rank == (2 if not config.prompt_kv_lora else 0)  # wk/wv LoRA the prompts bypass
    assert remains == (config.adapter_layers != 0)
    with torch.no_grad():
        before, after = model.double()(IDS), merged.double()(IDS)
    assert (before - after).abs().max() < 1e-5


def test_merge_refuses_to_overwrite_the_base(stories260k_dir, tmp_path, capsys):
    save_adapter(build_adapter_model(load_model(stories260k_dir), MODES["v1"]), tmp_path / "adapter")
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
    after, config = load_adapter_model(tmp_path / "merged", tmp_path / "merged")
    assert config.gate_activation == "identity"
    with torch.no_grad():
        assert torch.equal(before(IDS), after(IDS))  # nothing to fold: prompts and gates move over unchanged
