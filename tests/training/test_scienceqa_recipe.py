"""The ScienceQA recipe (V1 multimodal): both configs parse, the tiny one trains, exports and is evaluated, and
problems without an image get no visual contribution, in the model, in training/validation and in evaluation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DDPStrategy
from PIL import Image
from safetensors.torch import load_file

from lit_adapter.adapters import AdapterConfig, VisualConfig, load_adapter_model, save_adapter
from lit_adapter.adapters.visual import TINY_CLIP_MODEL, image_transform
from lit_adapter.checkpoint import load_yaml, tokenizer_path
from lit_adapter.cli import main
from lit_adapter.data.batch import IGNORE_INDEX
from lit_adapter.data.encoding import encode_segments
from lit_adapter.data.joint import JointDataModule
from lit_adapter.data.scienceqa import ScienceQADataModule, image_path, load_problems, training_segments
from lit_adapter.errors import LitAdapterError
from lit_adapter.evaluation.scienceqa import CATEGORIES
from lit_adapter.prompts import get_prompt_style
from lit_adapter.tokenizer import Tokenizer
from lit_adapter.training.cli import AdapterCLI, check_ddp_settings, check_routing, fit_main
from lit_adapter.training.module import LitAdapterModule
from tests.training import helpers

CONFIGS = helpers.REPO / "configs"
TINY_CONFIG, RECIPE_CONFIG = CONFIGS / "scienceqa_tiny.yaml", CONFIGS / "llama7b_v1_scienceqa.yaml"
DATA = "--data.instruction.init_args."


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread, as `helpers.run_cli` gives its processes: the tiny model gains nothing from two, and
    loses much when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sample(assets: Path) -> Path:
    return assets / "scienceqa"


@pytest.fixture(scope="module")
def image_dir(sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small PNGs, in the official layout, for every sample problem that has an image (the real ones are not in
    the assets); each differs from the others."""
    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val", "test"):
        for problem in load_problems(sample, split):
            if problem.image:
                path = root / split / problem.pid / problem.image
                path.parent.mkdir(parents=True)
                pixels = torch.randint(0, 256, (24, 24, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(path)
    return root


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fixed tiny CLIP tower, so that training and evaluation encode images alike."""
    return helpers.write_tiny_clip_weights(tmp_path_factory.mktemp("clip") / "tiny_clip.pt")


def tiny_recipe_adapter(clip_weights: Path) -> AdapterConfig:
    """The adapter of configs/scienceqa_tiny.yaml (with the fixed tower)."""
    config = yaml.safe_load(TINY_CONFIG.read_text())["model"]["adapter"]
    return AdapterConfig.from_dict({**config, "visual": {**config["visual"], "clip_pretrained": str(clip_weights)}})


# ---- (a) the configs ----


def print_config(capsys: pytest.CaptureFixture, path: Path, *overrides: str) -> dict:
    with pytest.raises(SystemExit) as done:
        AdapterCLI(args=["fit", "--config", str(path), *overrides, "--print_config"])
    assert done.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_the_recipe_config_is_the_v1_multimodal_setup(capsys: pytest.CaptureFixture) -> None:
    config = print_config(capsys, RECIPE_CONFIG)
    trainer, model, data = config["trainer"], config["model"], config["data"]
    sqa = data["instruction"]["init_args"]
    assert data["instruction"]["class_path"] == "lit_adapter.data.scienceqa.ScienceQADataModule"
    assert data["caption"] is None and model["route_groups"] is False
    assert (trainer["devices"], trainer["strategy"], trainer["precision"]) == (8, "ddp", "bf16-true")
    effective_batch = trainer["devices"] * sqa["batch_size"] * trainer["accumulate_grad_batches"]
    assert effective_batch == 32 and model["learning_rate"] == pytest.approx(9e-3 * effective_batch / 256)
    assert (trainer["max_epochs"], model["warmup_epochs"], model["weight_decay"]) == (5, 2, 0.02)
    assert model["betas"] == [0.9, 0.95] and sqa["max_seq_length"] == 512 and sqa["image_dir"]
    adapter = AdapterConfig.from_dict(model["adapter"])
    assert (adapter.adapter_len, adapter.adapter_layers, adapter.gate_activation, adapter.fusion) == (
        10, 30, "tanh", "late")  # fmt: skip
    assert adapter.visual == VisualConfig(clip_model="ViT-L-14", clip_pretrained="openai", mode="global")
    assert adapter.visual_tokens == 1 and sqa["clip_model"] is None  # the image transform is the model's (linked)


def test_the_recipe_config_instantiates_with_tiny_overrides(sample: Path, image_dir: Path, tmp_path: Path) -> None:
    """The 7B recipe's structure, made small: the CLI builds the trainer, the model and the ScienceQA data."""
    cli = AdapterCLI(args=[
        "--config", str(RECIPE_CONFIG), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.strategy", "auto", "--trainer.precision", "32-true", "--trainer.default_root_dir", str(tmp_path),
        "--model.checkpoint_dir", "stories260K", "--model.adapter.adapter_layers", "4",
        "--model.adapter.visual.clip_model", TINY_CLIP_MODEL, "--model.adapter.visual.clip_pretrained", "null",
        f"{DATA}data_dir", str(sample), f"{DATA}image_dir", str(image_dir),
        f"{DATA}val_split", "val", f"{DATA}num_workers", "0",
    ], run=False)  # fmt: skip
    data = cli.datamodule.parts["instruction"]
    assert isinstance(data, ScienceQADataModule)
    assert (data.clip_model, data.style.name) == (TINY_CLIP_MODEL, "alpaca")  # handed over from the model
    assert data.carries_images and cli.datamodule.carries_images == {"instruction": True}
    assert cli.model.adapter_config.visual.mode == "global" and cli.model.hparams.route_groups is False
    assert cli.model.hparams.learning_rate == pytest.approx(1.125e-3)


def test_tiny_config_parses(capsys: pytest.CaptureFixture) -> None:
    config = print_config(capsys, TINY_CONFIG)
    assert config["model"]["checkpoint_dir"] == "stories260K" and config["trainer"]["precision"] == "32-true"
    assert config["trainer"]["accelerator"] == "cpu" and config["model"]["route_groups"] is False
    visual = config["model"]["adapter"]["visual"]
    assert (visual["clip_model"], visual["clip_pretrained"], visual["mode"]) == (TINY_CLIP_MODEL, None, "global")
    assert config["data"]["instruction"]["init_args"]["clip_model"] is None  # set once, on the model's visual


# ---- (b) the tiny recipe end to end ----


def option_scores(model, tokenizer: Tokenizer, problem, image: torch.Tensor, has_image: bool) -> list[float]:
    """Summed log-probability of each option's answer sentence, one forward per option, through the masked path
    that training uses (a placeholder image and has_image)."""
    style = get_prompt_style("alpaca")
    scores = []
    for choice in range(len(problem.choices)):
        ids, supervised = encode_segments(tokenizer, training_segments(dataclasses.replace(problem, answer=choice),
                                                                       style))  # fmt: skip
        ids, supervised = ids[:-1], supervised[:-1]  # the closing EOS is not scored
        with torch.no_grad():
            logits = model(torch.tensor([ids]), images=image[None], has_image=torch.tensor([has_image]))[0]
        log_probs = torch.log_softmax(logits[:-1].float(), dim=-1)
        scores.append(sum(float(log_probs[t - 1, ids[t]]) for t in range(1, len(ids)) if supervised[t]))
    return scores


def test_tiny_recipe_trains_exports_and_evaluates(
    sample: Path, image_dir: Path, clip_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "run"
    fit_main([
        "--config", str(TINY_CONFIG), "--trainer.default_root_dir", str(root), "--trainer.max_steps", "4",
        "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "2",
        "--trainer.enable_progress_bar", "false", "--checkpoint.every_n_train_steps", "4",
        "--model.adapter.visual.clip_pretrained", str(clip_weights),
        f"{DATA}data_dir", str(sample), f"{DATA}image_dir", str(image_dir),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert "validation loss before training:" in out and "(instruction " in out
    adapter = load_file(root / "adapter.safetensors")
    assert {"visual.visual_proj.0.weight", "visual.visual_proj.2.weight", "visual.visual_proj_norm.weight"} <= set(
        adapter)  # fmt: skip
    assert not any(name.startswith("visual.clip.") for name in adapter)
    gates = [t for name, t in adapter.items() if name.endswith(".adaption_prompt.gate")]
    assert len(gates) == 4 and all(gate.abs().sum() > 0 for gate in gates)  # zero-init gates have moved
    assert load_yaml(root / "adapter_config.yaml")["visual"]["mode"] == "global"
    training = load_yaml(root / "training.yaml")
    assert training["optimizer_steps"] == 4 and training["trainable_parameters"]["visual"] > 0

    base, evaluated = Path(training["checkpoint_dir"]), tmp_path / "eval"
    main(["eval", "scienceqa", "--data_dir", str(sample), "--split", "val", "--limit", "8", "--mode", "likelihood",
          "--images", str(image_dir), "--checkpoint_dir", str(base), "--adapter", str(root), "--output",
          str(evaluated), "--device", "cpu", "--precision", "32-true"])  # fmt: skip
    table = capsys.readouterr().out
    print(table)  # the table of the tiny run, for the record (pytest -s)
    assert table.splitlines()[0].split() == ["Avg", *CATEGORIES]

    problems = load_problems(sample, "val")[:8]
    records = [json.loads(line) for line in (evaluated / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((evaluated / "metrics.json").read_text())
    total, correct = metrics["total"], metrics["correct"]
    assert [r["pid"] for r in records] == [p.pid for p in problems] and metrics["missing"] == 0
    assert total["Avg"] == metrics["num_problems"] == 8 and correct["Avg"] == sum(r["correct"] for r in records)
    assert total["NAT"] + total["SOC"] + total["LAN"] == 8 and total["G1-6"] + total["G7-12"] == 8
    assert total["IMG"] == sum(bool(p.image) for p in problems) and total["NO"] == sum(
        not p.image and not p.hint for p in problems)  # fmt: skip
    assert all(0 <= correct[c] <= total[c] for c in total)

    # evaluation answers problems without an image exactly as training sees them (no visual contribution), and
    # those with one through the same tower and adapter
    model = load_adapter_model(base, root)
    tokenizer, transform = Tokenizer(tokenizer_path(base)), image_transform(TINY_CLIP_MODEL, train=False)
    blank = torch.zeros(3, 32, 32)
    compared = {True: 0, False: 0}
    for problem, record in zip(problems, records, strict=True):
        if record["truncated"]:
            continue
        image = transform(Image.open(image_path(problem, image_dir)).convert("RGB")) if problem.image else blank
        expected = option_scores(model, tokenizer, problem, image, bool(problem.image))
        assert record["scores"] == pytest.approx(expected, abs=2e-4), problem.pid
        compared[bool(problem.image)] += 1
    assert compared[True] >= 2 and compared[False] >= 2


# ---- (c) no image, no visual contribution ----


@pytest.mark.parametrize("fusion", ["late", "early"])
def test_rows_without_an_image_get_no_visual_contribution(stories260k_dir: Path, fusion: str) -> None:
    """late: the recipe (global token added to the prompts); early: V2 paper bias/scale (so wk/wv have biases and a
    zero visual prompt would still attend to them) with the visual tokens as their own prompt."""
    torch.manual_seed(0)
    if fusion == "late":
        config = AdapterConfig.v1(adapter_len=4, adapter_layers=3,
                                  visual=VisualConfig(clip_model=TINY_CLIP_MODEL, clip_pretrained=None, mode="global"))
    else:
        config = AdapterConfig.v2(adapter_len=4, visual=helpers.tiny_visual())
    model = helpers.adapter_model(stories260k_dir, config).eval()
    helpers.set_gates(model, 0.5)
    with torch.no_grad():
        for name, param in model.adapter_parameters().items():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    ids = torch.randint(3, 512, (3, 12), generator=torch.Generator().manual_seed(1))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    images[1] = 0  # the placeholder of a problem without an image, as the data module makes it
    has_image = torch.tensor([True, False, True])
    with torch.no_grad():
        masked = model(ids, images=images, has_image=has_image)
        text_only = model(ids)
        unmasked = model(ids, images=images)
    torch.testing.assert_close(masked[1], text_only[1], rtol=0, atol=1e-6)
    for row in (0, 2):
        assert (masked[row] - text_only[row]).abs().max() > 1e-2
        torch.testing.assert_close(masked[row], unmasked[row], rtol=0, atol=1e-6)
    assert (unmasked[1] - text_only[1]).abs().max() > 1e-2  # a zero image alone is not "no image"
    with pytest.raises(LitAdapterError, match="one flag per image"):
        model(ids, images=images, has_image=has_image[:2])


class LossesWithBatches(Callback):
    """The loss each training step computed, with its batch (lr 0: the weights stay as they were)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, dict]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append((float(outputs["loss"]), batch))


def reference_loss(model, batches: list[dict]) -> float:
    """Token-mean cross-entropy, each row run alone: with its image, or with no image input at all."""
    total, count = 0.0, 0
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][row].sum())
            ids, labels = batch["input_ids"][row, None, :length], batch["labels"][row, :length]
            image = batch["images"][row, None] if batch["has_image"][row] else None
            with torch.no_grad():
                logits = model(ids, images=image)[0]
            targets = labels[1:]
            losses = torch.nn.functional.cross_entropy(logits[:-1].double(), targets.clamp(min=0), reduction="none")
            total += float(losses[targets != IGNORE_INDEX].sum())
            count += int((targets != IGNORE_INDEX).sum())
    return total / count


def test_training_and_validation_steps_mask_problems_without_an_image(
    stories260k_dir: Path, sample: Path, image_dir: Path, clip_weights: Path, tmp_path: Path
) -> None:
    config = tiny_recipe_adapter(clip_weights)
    start = helpers.adapter_model(stories260k_dir, config)
    helpers.set_gates(start, 0.5)
    init = save_adapter(start, tmp_path / "init")
    module = LitAdapterModule(str(stories260k_dir), config, learning_rate=0.0, warmup_steps=0, route_groups=False,
                              init_adapter=str(init))  # fmt: skip
    data = JointDataModule(instruction=ScienceQADataModule(sample, image_dir=image_dir, max_seq_length=512,
                                                           batch_size=4), model_settings=module.data_settings)
    losses = LossesWithBatches()
    trainer = helpers.trainer(tmp_path, max_steps=2, limit_val_batches=2, val_check_interval=2, callbacks=[losses])
    trainer.fit(module, data)
    assert trainer.callback_metrics.keys() >= {"val_loss", "val_instruction_loss"}  # ScienceQA is not captions
    model = module.model.eval()
    assert all(batch["source"] == "instruction" for _, batch in losses.seen)
    assert any(not batch["has_image"].all() for _, batch in losses.seen)  # some rows have no image
    for loss, batch in losses.seen:
        assert loss == pytest.approx(reference_loss(model, [batch]), rel=1e-5)
    val_batches = [batch for _, batch in zip(range(2), data.val_dataloader()[0], strict=False)]
    assert not all(batch["has_image"].all() for batch in val_batches)
    val_loss = float(trainer.callback_metrics["val_instruction_loss"])
    assert val_loss == pytest.approx(reference_loss(model, val_batches), rel=1e-5)


def test_images_in_the_instruction_slot_need_route_groups_off_and_not_unused_parameters(sample: Path) -> None:
    with_images, text_only = ScienceQADataModule(sample, image_dir=Path("images")), ScienceQADataModule(sample)
    assert with_images.carries_images and not text_only.carries_images  # what the data declares
    with_images, text_only = {"instruction": True}, {"instruction": False}
    check_ddp_settings(DDPStrategy(), True, with_images)  # every batch uses the visual adapter: plain DDP is fine
    with pytest.raises(LitAdapterError, match="ddp_find_unused_parameters_true"):
        check_ddp_settings(DDPStrategy(), True, text_only)
    check_routing(False, True, with_images)
    check_routing(True, True, text_only)
    with pytest.raises(LitAdapterError, match="set model.route_groups: false"):
        check_routing(True, True, with_images)
