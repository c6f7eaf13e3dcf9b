"""Adapter files: our format's files and legacy names, the official V1/V2/LoRA/65B formats and their errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from lit_adapter.adapters import AdapterConfig, attach_adapters, load_adapter, read_adapter, save_adapter
from lit_adapter.adapters.visual import VisualAdapter
from lit_adapter.config import ModelConfig
from lit_adapter.errors import LitAdapterError
from lit_adapter.model import LLaMA
from tests.adapters.helpers import (
    ATTENTION,
    DIM,
    FFN,
    HEADS,
    IDS,
    KV_DIM,
    LAYERS,
    MODES,
    images,
    official_v1,
    one_line_error,
    rand,
    randomize,
    tiny_visual,
)
from tests.adapters.reference import Adapter, reference_logits

# ---------------------------------------------------------------------------------------------------- our format


def test_our_files_hold_the_adapter_tensors_and_the_base_model(stories260k, tmp_path):
    config = AdapterConfig.v2(adapter_len=3, lora_rank=2, prompt_style="chat")
    model = attach_adapters(stories260k, config)
    save_adapter(model, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(model.adapter_names)  # the adapter's own tensors only: no base
    header = yaml.safe_load((tmp_path / "adapter" / "adapter_config.yaml").read_text())
    base = ModelConfig.from_name("stories260K")
    assert header["base_model"] == {"name": "stories260K", "architecture_hash": base.architecture_hash()}
    assert header["prompt_style"] == "chat" and header["bias_mode"] == "paper"
    adapter = read_adapter(tmp_path / "adapter", base)
    assert adapter.config == config and adapter.kind == "lit-adapter" and adapter.origin == {}
    assert adapter.path == tmp_path / "adapter" / "adapter.safetensors"


def test_files_saved_under_the_old_seam_name_load(stories260k, tmp_path):
    """Files written while the seam was `Attention.prefix` hold `...attention.prefix.*` keys: they load as today's."""
    model = attach_adapters(stories260k, MODES["v2-early-overlap-newgate"])
    randomize(model)
    save_adapter(model, tmp_path / "adapter")
    old = {k.replace(".adaption_prompt.", ".prefix."): v for k, v in model.adapter_state_dict().items()}
    assert sum(".prefix." in k for k in old) == 5 * 3 + 2  # prompt, gate, new_gate on 5 layers; 2 visual gates
    save_file(old, str(tmp_path / "adapter" / "adapter.safetensors"))
    adapter = read_adapter(tmp_path / "adapter", stories260k.config)
    assert set(adapter.tensors) == set(model.adapter_names)
    assert adapter.origin["llama.layers.0.attention.adaption_prompt.visual_gate"] == (
        "llama.layers.0.attention.prefix.visual_gate")
    loaded = load_adapter(LLaMA(stories260k.config), tmp_path / "adapter")
    for name, tensor in model.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[name], tensor), name
    # a wrong shape is reported under the file's own (old) key
    old["llama.layers.3.attention.prefix.prompt"] = torch.zeros(5, DIM)
    save_file(old, str(tmp_path / "adapter" / "adapter.safetensors"))
    with pytest.raises(LitAdapterError) as err:
        load_adapter(LLaMA(stories260k.config), tmp_path / "adapter")
    one_line_error(err, "adapter.safetensors", "'llama.layers.3.attention.prefix.prompt'", "[5, 64]")


def test_missing_adapter_file(tmp_path, stories260k):
    with pytest.raises(LitAdapterError) as err:
        load_adapter(stories260k, tmp_path)
    one_line_error(err, "no adapter.safetensors")


# ---------------------------------------------------------------------------------------------- official formats


def meta_weights(model: LLaMA) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in model.state_dict().items()}


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


def test_a_wrong_shape_in_an_official_file_names_the_official_key(stories260k, tmp_path, clip_weights):
    checkpoint = official_v2(clip_weights, lora=True)
    checkpoint["model"]["llama.layers.1.attention.lora_wk_l2.weight"] = torch.zeros(DIM, 2)  # wk is 32 wide here
    torch.save(checkpoint, tmp_path / "LORA-BIAS-7B.pth")
    adapter = read_adapter(tmp_path / "LORA-BIAS-7B.pth", stories260k.config, visual=tiny_visual())
    assert adapter.kind == "official-v2"
    assert adapter.file_key("llama.layers.1.attention.wk.lora_l2") == "llama.layers.1.attention.lora_wk_l2.weight"
    with pytest.raises(LitAdapterError) as err:
        load_adapter(stories260k, tmp_path / "LORA-BIAS-7B.pth", visual=tiny_visual(clip_pretrained=clip_weights))
    one_line_error(err, "LORA-BIAS-7B.pth", "'llama.layers.1.attention.lora_wk_l2.weight'", "[64, 2]", "[32, 2]")


# ---- official V2 files: text-only without CLIP weights, BGR images; 65B files answer in the chat template ----

def official_v2_vit_l(lora: bool = False) -> dict:
    """An official V2 file whose visual adapter takes ViT-L/14's 768-wide features (as BIAS-7B), at tiny widths:
    it implies open_clip's ViT-L-14 with the `openai` weights, which are nowhere on this machine."""
    from lit_adapter.adapters.formats.official import VISUAL_PREFIXES
    from lit_adapter.adapters.visual import VisualConfig

    checkpoint = official_v2(None, lora)
    sd = {k: v for k, v in checkpoint["model"].items() if not k.startswith(VISUAL_PREFIXES)}
    torch.manual_seed(5)
    visual = VisualAdapter(VisualConfig(clip_model="ViT-L-14", clip_pretrained=None, visual_len=3, n_blocks=1,
                                        block_heads=16, width=32), DIM, load_clip=False)
    sd |= {name: rand(*param.shape) for name, param in visual.named_parameters()}
    return {**checkpoint, "model": sd}


def test_official_v2_file_generates_text_only_without_clip_weights(stories260k_dir, tmp_path, capsys, monkeypatch):
    import json
    import socket

    from lit_adapter.adapters.model import assign_adapter
    from lit_adapter.checkpoint import load_model
    from lit_adapter.inference.engine import Decoding
    from tests.helpers import run_main
    from tests.inference.conftest import engine_for

    torch.save(official_v2_vit_l(), tmp_path / "BIAS-7B.pth")
    adapter = read_adapter(tmp_path / "BIAS-7B.pth", load_config_of(stories260k_dir))
    assert (adapter.config.visual.clip_model, adapter.config.visual.clip_pretrained) == ("ViT-L-14", "openai")
    assert adapter.config.visual.channel_order == "bgr"  # as the official code feeds its images

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    code, out, err = run_main(["generate", "--checkpoint_dir", str(stories260k_dir), "--adapter",
                               str(tmp_path / "BIAS-7B.pth"), "--prompt", "Tell me a story.", "--temperature", "0",
                               "--max_new_tokens", "12", "--json"], capsys, monkeypatch)
    assert code == 0, err
    # the reference: the same file on a model built without any CLIP tower, decoded greedily
    model = attach_adapters(load_model(stories260k_dir), adapter.config, load_clip=False)
    assign_adapter(model, adapter)
    engine = engine_for(stories260k_dir, model.eval(), style="alpaca")
    expected = engine.complete(engine.encode(engine.format("Tell me a story.")), Decoding(max_new_tokens=12))
    assert json.loads(out)["text"] == expected.text


def load_config_of(checkpoint_dir):
    from lit_adapter.checkpoint import load_config

    return load_config(checkpoint_dir)


def test_official_65b_files_answer_in_the_chat_template(stories260k_dir, tmp_path):
    from lit_adapter.inference.engine import Engine

    sd = {f"layers.{i}.{parent}.{n}_{part}": rand(out) if part == "bias" else 1 + rand(inp)
          for i in range(LAYERS) for parent, shapes in (("attention", ATTENTION), ("feed_forward", FFN))
          for n, (out, inp) in shapes.items() for part in ("bias", "scale")}
    torch.save({"model": sd}, tmp_path / "chat65b.pth")
    assert read_adapter(tmp_path / "chat65b.pth", load_config_of(stories260k_dir)).config.prompt_style == "chat"
    engine = Engine.load(stories260k_dir, tmp_path / "chat65b.pth", device="cpu", precision="32-true")
    assert engine.style.name == "chat" and engine.style.stop_sequences == ("###",)
    seeded = Engine.load(stories260k_dir, tmp_path / "chat65b.pth", device="cpu", precision="32-true",
                         prompt_style="chat_official")
    assert seeded.format("Hi").endswith("###Human: Hi###Assistant:") and "three tips" in seeded.format("Hi")
