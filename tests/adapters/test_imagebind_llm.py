"""ImageBind-LLM: the official `7B.pth` layout (stories260K sizes) loads through `--adapter`, computes the official
formula (bind network, one prompt token per layer plus the bound embedding, tanh gates, bias + LoRA), its
zero-init form reproduces the base bit for bit, and it generates from weighted image + audio inputs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lit_adapter.adapters import load_adapter, load_adapter_model, read_adapter
from lit_adapter.checkpoint import load_model
from lit_adapter.encoders.imagebind import load_imagebind
from lit_adapter.errors import LitAdapterError
from lit_adapter.media.inputs import parse_input
from tests.adapters.helpers import ATTENTION, DIM, FFN, GENERATOR, HEADS, IDS, LAYERS, one_line_error, rand
from tests.adapters.reference import Adapter, reference_logits
from tests.adapters.test_formats import meta_weights, official_v2_linear
from tests.encoders.helpers import save_tiny_imagebind
from tests.encoders.test_media import write_sine
from tests.helpers import run_main as run
from tests.helpers import write_image

RANK, HIDDEN = 4, 4 * DIM


def official_imagebind_llm(zero: bool = False, norms=None, seed: int = 0) -> dict:
    """`{'model': sd}` in the 7B.pth layout at stories260K size, the same values whichever test asks first;
    `zero`: the finetune-phase init (gates, biases and LoRA l2 zero, norms = `norms`, the base's)."""
    GENERATOR.manual_seed(seed)
    def value(*shape, scale=0.2):
        return torch.zeros(shape) if zero else rand(*shape, scale=scale)

    sd = {"image_bind_proj.weight": rand(DIM, 1024, scale=1.0), "image_bind_proj.bias": rand(DIM)}
    for k in (1, 2, 3):
        sd[f"image_bind_norm_{k}.weight"] = 1 + rand(DIM)
        sd[f"image_bind_f1_{k}.weight"] = rand(HIDDEN, DIM, scale=0.1)
        sd[f"image_bind_f3_{k}.weight"] = rand(HIDDEN, DIM, scale=0.1)
        sd[f"image_bind_f2_{k}.weight"] = rand(DIM, HIDDEN, scale=0.1)
    sd["prefix_query.weight"] = rand(LAYERS, DIM, scale=1.0)
    for i in range(LAYERS):
        p = f"llama.layers.{i}."
        sd[p + "attention.gate"] = value(1, HEADS, 1, 1, scale=1.0)
        sd |= {p + f"attention.{n}.bias": value(ATTENTION[n][0]) for n in ("wq", "wo")}
        sd |= {p + f"feed_forward.{n}.bias": value(FFN[n][0]) for n in FFN}
        for parent, shapes in (("attention", ATTENTION), ("feed_forward", FFN)):
            for n, (out, inp) in shapes.items():
                sd[p + f"{parent}.lora_{n}_l1.weight"] = rand(RANK, inp, scale=0.3)
                sd[p + f"{parent}.lora_{n}_l2.weight"] = value(out, RANK, scale=0.3)
        for n in ("attention_norm", "ffn_norm"):
            sd[p + f"{n}.weight"] = norms[f"layers.{i}.{n}.weight"].clone() if zero else 1 + rand(DIM)
    sd["llama.norm.weight"] = norms["norm.weight"].clone() if zero else 1 + rand(DIM)
    return {"model": sd}


def official_bind(sd: dict, f: torch.Tensor) -> torch.Tensor:
    """The official bind network: v = proj(f); v += f2_k(silu(f1_k(n_k(v))) * f3_k(n_k(v))), n_k RMSNorm eps 1e-6."""
    v = f @ sd["image_bind_proj.weight"].T + sd["image_bind_proj.bias"]
    for k in (1, 2, 3):
        h = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[f"image_bind_norm_{k}.weight"]
        v = v + (F.silu(h @ sd[f"image_bind_f1_{k}.weight"].T) * (h @ sd[f"image_bind_f3_{k}.weight"].T)) @ sd[
            f"image_bind_f2_{k}.weight"].T
    return v[:, None]


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    return save_tiny_imagebind(tmp_path_factory.mktemp("encoder") / "imagebind_w3D.pth")


def test_the_official_layout_reads_as_imagebind_llm(stories260k, tmp_path):
    torch.save(official_imagebind_llm(), tmp_path / "7B.pth")
    adapter = read_adapter(tmp_path / "7B.pth", stories260k.config)
    c = adapter.config
    assert adapter.kind == "official-imagebind-llm"
    assert (c.adapter_len, c.adapter_layers, c.fusion, c.bias_mode, c.train_norms, c.lora_rank, c.prompt_kv_lora,
            c.lora_alpha) == (1, LAYERS, "late", "official_7b", True, RANK, False, None)
    assert (c.visual.encoder, c.visual.mode, c.visual.n_blocks, c.visual.width) == ("imagebind", "bind", 3, HIDDEN)
    assert adapter.file_key("llama.layers.2.attention.adaption_prompt.prompt") == "prefix_query.weight"
    assert adapter.file_key("visual.bind.blocks.2.f2.weight") == "image_bind_f2_3.weight"


def test_the_official_file_computes_the_official_formula(stories260k, tmp_path, encoder_file, float64_base):
    checkpoint = official_imagebind_llm()
    sd = checkpoint["model"]
    torch.save(checkpoint, tmp_path / "7B.pth")
    weights = meta_weights(stories260k)
    model = load_adapter(stories260k, tmp_path / "7B.pth")
    assert model.visual.clip is None  # the encoder comes from --encoder_weights
    model.visual.attach_encoder(load_imagebind(encoder_file))
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    audio = torch.randn(1, 3, 1, 128, 204, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = model.encode_images([("vision", images, 0.5), ("audio", audio, 1.5)])
        # official forward_visual: normalise each ImageBind output, weights / (sum + 1e-6), sum, bind network
        encoder = load_imagebind(encoder_file)
        e = encoder.encode({"vision": images, "audio": audio})
        f = 0.5 / (2 + 1e-6) * F.normalize(e["vision"], dim=-1) + 1.5 / (2 + 1e-6) * F.normalize(e["audio"], dim=-1)
        visual = official_bind(sd, f)
        torch.testing.assert_close(tokens, visual)
    model = model.double()
    # layer i: prompt = v + prefix_query[i] through the base wv only; o += tanh(g_i) * wv(prompt) (one position:
    # the reference's softmax over it is exactly 1)
    query = sd["prefix_query.weight"].double()
    reference = Adapter(
        prompts={i: query[i: i + 1] for i in range(LAYERS)},
        gates={i: sd[f"llama.layers.{i}.attention.gate"].double() for i in range(LAYERS)},
        late_visual=visual.double(),
        linear=official_v2_linear(sd, with_lora=True),
        prompt_linear=official_v2_linear(sd, with_lora=False),
        norms={k.removeprefix("llama."): v.double() for k, v in sd.items() if k.endswith("norm.weight")},
    )
    with torch.no_grad():
        logits = model(IDS, visual_tokens=visual.double())
        torch.testing.assert_close(logits, reference_logits(weights, model.config, IDS, reference), atol=1e-6, rtol=0)


def test_the_zero_init_form_reproduces_the_base_bit_for_bit(stories260k_dir, tmp_path, encoder_file):
    base = load_model(stories260k_dir)
    norms = {k: v for k, v in base.state_dict().items() if k.endswith("norm.weight")}
    torch.save(official_imagebind_llm(zero=True, norms=norms), tmp_path / "7B.pth")
    model = load_adapter_model(stories260k_dir, tmp_path / "7B.pth")
    model.visual.attach_encoder(load_imagebind(encoder_file))
    with torch.no_grad():
        tokens = model.encode_images(torch.randn(2, 3, 224, 224))
        assert tokens.abs().sum() > 0
        assert torch.equal(model(IDS, visual_tokens=tokens), base.eval()(IDS))


def test_bad_official_files_are_one_line(stories260k, tmp_path):
    sd = official_imagebind_llm()["model"]
    sd["prefix_query.weight"] = rand(LAYERS + 1, DIM)
    torch.save({"model": sd}, tmp_path / "other.pth")
    with pytest.raises(LitAdapterError) as err:
        read_adapter(tmp_path / "other.pth", stories260k.config)
    one_line_error(err, "other.pth", "'prefix_query.weight'", "another base model")
    sd = official_imagebind_llm()["model"]
    sd["image_bind_f1_1.bias"] = rand(HIDDEN)  # the legacy bridge
    torch.save({"model": sd}, tmp_path / "beta.pth")
    with pytest.raises(LitAdapterError) as err:
        read_adapter(tmp_path / "beta.pth", stories260k.config)
    one_line_error(err, "beta.pth", "'image_bind_f1_1.bias'", "legacy-bridge")


def test_weighted_input_specs():
    assert parse_input("audio", "b.wav:0.5").weight == 0.5 and str(parse_input("audio", "b.wav:0.5").path) == "b.wav"
    assert parse_input("image", "a.jpg").weight == 1.0
    assert str(parse_input("image", "C:/x/a.jpg").path) == "C:/x/a.jpg"
    with pytest.raises(LitAdapterError, match=">= 0"):
        parse_input("audio", "b.wav:-1")


def test_generate_with_weighted_image_and_audio(stories260k_dir, tmp_path, encoder_file, capsys, monkeypatch):
    torch.save(official_imagebind_llm(), tmp_path / "7B.pth")
    image = write_image(tmp_path / "a.png")
    write_sine(tmp_path / "b.wav", 2.0)
    common = ["generate", "--checkpoint_dir", str(stories260k_dir), "--adapter", str(tmp_path / "7B.pth"),
              "--encoder_weights", str(encoder_file), "--prompt", "Describe it.", "--temperature", "0",
              "--max_new_tokens", "8", "--json"]

    def text(*inputs: str) -> str:
        code, out, err = run([*common, *inputs], capsys, monkeypatch)
        assert code == 0, err
        return json.loads(out)["text"]

    mixed = text("--image", f"{image}:0.5", "--audio", f"{tmp_path / 'b.wav'}:0.5")
    assert mixed == text("--image", f"{image}:2", "--audio", f"{tmp_path / 'b.wav'}:2")  # only the ratio counts
    assert text("--image", str(image)) != text("--audio", str(tmp_path / "b.wav"))
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    code, _, err = run([*common, "--audio", str(tmp_path / "bad.wav")], capsys, monkeypatch)
    assert code == 2 and "bad.wav: cannot read audio" in err and len(err.strip().splitlines()) == 1


def test_the_cache_blends_the_retrieved_embeddings_before_the_bind_network(stories260k, tmp_path, encoder_file):
    from safetensors.torch import save_file

    from lit_adapter.encoders.joint import CacheSettings
    from lit_adapter.media.inputs import prepare_bind

    checkpoint = official_imagebind_llm()
    torch.save(checkpoint, tmp_path / "7B.pth")
    stored = F.normalize(torch.randn(6, 1024, generator=torch.Generator().manual_seed(2)), dim=-1)
    save_file({"embeddings": stored}, tmp_path / "cache.safetensors")
    model = load_adapter(stories260k, tmp_path / "7B.pth")
    prepare_bind(model.visual, encoder_file, tmp_path / "cache.safetensors", CacheSettings(3, 20.0, 0.25))
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tokens = model.encode_images(images)
        f = F.normalize(load_imagebind(encoder_file).encode({"vision": images})["vision"], dim=-1) / (1 + 1e-6)
        scores, ids = (f @ stored.T).topk(3)  # the 3 best by inner product
        r = F.normalize((torch.softmax(20 * scores, dim=-1)[..., None] * stored[ids]).sum(1), dim=-1)
        expected = official_bind(checkpoint["model"], F.normalize(0.75 * f + 0.25 * r, dim=-1))
    torch.testing.assert_close(tokens, expected)


def test_batch_mode_mixes_each_records_inputs_as_generate_does(stories260k_dir, tmp_path, encoder_file, capsys,
                                                               monkeypatch):
    torch.save(official_imagebind_llm(), tmp_path / "7B.pth")
    write_image(tmp_path / "a.png")
    write_sine(tmp_path / "b.wav", 2.0)
    records = [{"prompt": "Describe it.", "image": "a.png:0.5", "audio": "b.wav:0.5"},
               {"prompt": "Describe it.", "audio": "b.wav"}, {"prompt": "Describe it."},
               {"prompt": "Describe it.", "image": "a.png"}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    common = ["generate", "--checkpoint_dir", str(stories260k_dir), "--adapter", str(tmp_path / "7B.pth"),
              "--encoder_weights", str(encoder_file), "--temperature", "0", "--max_new_tokens", "8"]
    code, _, err = run([*common, "--prompts_file", str(tmp_path / "prompts.jsonl"), "--output_file",
                        str(tmp_path / "out.jsonl")], capsys, monkeypatch)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    flags = [["--image", f"{tmp_path / 'a.png'}:0.5", "--audio", f"{tmp_path / 'b.wav'}:0.5"],
             ["--audio", str(tmp_path / "b.wav")], [], ["--image", str(tmp_path / "a.png")]]
    for row, extra in zip(rows, flags, strict=True):
        code, out, err = run([*common, "--prompt", "Describe it.", "--json", *extra], capsys, monkeypatch)
        assert code == 0, err
        assert row["output"] == json.loads(out)["text"]
    assert len({row["output"] for row in rows[1:]}) == 3  # each record saw its own inputs
    assert rows[1]["audio"] == str(tmp_path / "b.wav")

    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Hi", "audio": "b.wav"}) + "\n")
    code, _, err = run(["generate", "--checkpoint_dir", str(stories260k_dir), "--prompts_file",
                        str(tmp_path / "prompts.jsonl"), "--output_file", str(tmp_path / "o.jsonl")],
                       capsys, monkeypatch)
    assert code == 2 and "prompts.jsonl:1: 'audio': needs an ImageBind-LLM adapter" in err
    assert len(err.strip().splitlines()) == 1


def test_scienceqa_eval_sees_the_images_through_imagebind(stories260k_dir, assets, tmp_path, encoder_file, capsys):
    from PIL import Image

    from lit_adapter.checkpoint import tokenizer_path
    from lit_adapter.cli import main
    from lit_adapter.data.scienceqa import load_problems
    from lit_adapter.tokenizer import Tokenizer
    from tests.evaluation.test_end_to_end import read_predictions, reference_scores

    torch.save(official_imagebind_llm(), tmp_path / "7B.pth")
    sample = assets / "scienceqa"
    problems = load_problems(sample, "test")[:3]  # pid 4 (no image), 5 and 11 (an image each)
    images = tmp_path / "images"
    for index, problem in enumerate(p for p in problems if p.image):
        (images / problem.pid).mkdir(parents=True)
        Image.new("RGB", (40, 30), (90 * index, 200 - 80 * index, 90)).save(images / problem.pid / problem.image)
    common = ["eval", "scienceqa", "--data_dir", str(sample), "--checkpoint_dir", str(stories260k_dir), "--adapter",
              str(tmp_path / "7B.pth"), "--mode", "likelihood", "--limit", "3", "--device", "cpu", "--precision",
              "32-true"]
    main([*common, "--images", str(images), "--encoder_weights", str(encoder_file), "--output", str(tmp_path / "w")])
    with pytest.raises(SystemExit):  # the official adapter without its encoder: one line, exit 2
        main([*common, "--images", str(images), "--output", str(tmp_path / "x")])
    assert "--encoder_weights" in capsys.readouterr().err.strip().splitlines()[-1]

    model = load_adapter_model(stories260k_dir, tmp_path / "7B.pth")
    model.visual.attach_encoder(load_imagebind(encoder_file))
    tokenizer = Tokenizer(tokenizer_path(stories260k_dir))
    transform = model.visual.config.transform(train=False)
    seen = 0
    for problem, record in zip(problems, read_predictions(tmp_path / "w"), strict=True):
        if record["truncated"]:
            continue
        pixels = transform(Image.open(images / problem.pid / problem.image))[None] if problem.image else None
        assert record["scores"] == pytest.approx(reference_scores(model, tokenizer, problem, pixels), abs=1e-3)
        seen += problem.image is not None
    assert seen >= 1
