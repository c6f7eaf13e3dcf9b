"""Bad inputs through the real CLI, one parametrized row each: exit status 2, exactly one line on stderr, no
traceback, and the line names the file, record, key or option at fault.

Every row runs `lit-adapter ARGS` as its own process: forked from one process that has imported the package
(tests/cli_runner.py), so a row costs what its command does, not an interpreter and torch start-up. A few rows also
run as plain subprocesses (`python -m lit_adapter.cli`) and must print the same line. Rows that train stop at the
first step; the one real run they resume from is trained once for the whole table.

A row's argv and fragments are templates over the shared folders (`{stories}`, `{run}`, ...) and the row's own
work folder `{work}`, where its `setup` writes the bad input.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lit_adapter.config import ModelConfig
from tests.cli_runner import run_batch
from tests.convert.test_errors import hf_folder, meta_folder
from tests.helpers import assert_cli_error, random_state_dict, run_cli, write_image

Setup = Callable[[Path, dict], Optional[dict]]  # (work folder, shared folders) -> more template fields


@dataclasses.dataclass
class Row:
    kind: str  # the class of input, for the summary
    argv: str  # template, split like a shell line
    fragments: tuple[str, ...]  # templates, each must appear in the error line
    setup: Optional[Setup] = None
    code: int = 2
    stdin: Optional[str] = None
    env: dict = dataclasses.field(default_factory=dict)


# ---- the bad inputs ----


def write_yaml(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def text_config(root: Path, stories: Path, instructions: Path, **changes: Any) -> dict:
    """The smallest `lit-adapter fit` config: V1 prompts on stories260K, the tiny instruction file, one step."""
    config = {
        "seed_everything": 7,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 1,
                    "default_root_dir": str(root), "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0, "limit_val_batches": 0, "logger": False},
        "model": {"checkpoint_dir": str(stories), "adapter": {"adapter_len": 4, "adapter_layers": 2,
                                                              "prompt_style": "raw"}, "warmup_steps": 0},
        "data": {"instruction": {"class_path": "lit_adapter.data.instruction.InstructionDataModule",
                                 "init_args": {"data_path": str(instructions), "max_seq_length": 32,
                                               "batch_size": 4, "val_split": 4}}},
        "checkpoint": {"every_n_train_steps": 1},
        "export_adapter": False,
    }  # fmt: skip
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = value
    return config


def fit_setup(**changes: Any) -> Setup:
    """A row whose config is `text_config` with `changes` (keys joined by "__", e.g. model__adapter__adapter_lenn)."""

    def setup(work: Path, shared: dict) -> dict:
        config = text_config(work / "run", shared["stories"], shared["instructions"], **changes)
        return {"config": write_yaml(work / "fit.yaml", config)}

    return setup


def data_setup(records: Any = None, raw: Optional[bytes] = None, name: str = "data.json", **changes: Any) -> Setup:
    """A fit row whose instruction data is `records` (JSON) or the bytes `raw`."""

    def setup(work: Path, shared: dict) -> dict:
        data = work / name
        data.write_bytes(raw if raw is not None else json.dumps(records).encode())
        config = text_config(work / "run", shared["stories"], shared["instructions"],
                             data__instruction__init_args__data_path=str(data), **changes)
        return {"config": write_yaml(work / "fit.yaml", config), "data": data}

    return setup


def caption_setup(image: str, **caption_args: Any) -> Setup:
    """A fit row with caption data only (so that no other data's summary precedes its line): three good images
    and one `image` (missing, corrupt_body or not_image; "no_file": the caption file itself is missing)."""

    def setup(work: Path, shared: dict) -> dict:
        images = [write_image(work / f"good{i}.png", (40 * i, 90, 20)) for i in range(3)]
        bad = work / f"{image}.png"
        if image == "corrupt_body":
            write_corrupt_body_png(bad)
        elif image == "not_image":
            bad.write_text("not an image")
        records = [{"image": p.name, "caption": f"a picture number {i}"} for i, p in enumerate([*images, bad])]
        captions = work / "captions.jsonl"
        if image != "no_file":
            captions.write_text("".join(json.dumps(r) + "\n" for r in records))
        config = text_config(work / "run", shared["stories"], shared["instructions"])
        config["model"]["adapter"]["visual"] = {"clip_model": "lit-adapter-tiny-vit", "clip_pretrained": None,
                                                "visual_len": 3, "n_blocks": 1, "block_heads": 2}
        config["data"] = {}
        config["data"]["caption"] = {"class_path": "lit_adapter.data.caption.CaptionDataModule",
                                     "init_args": {"data_path": str(captions), "max_seq_length": 48, "batch_size": 2,
                                                   "val_split": 0, **caption_args}}
        return {"config": write_yaml(work / "fit.yaml", config), "data": captions, "bad": bad}

    return setup


def write_corrupt_body_png(path: Path) -> Path:
    """A PNG whose header (and so size and mode) reads fine but whose pixel data is cut short."""
    from PIL import Image

    noise = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.numpy()).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def checkpoint_setup(edit: Callable[[Path], None]) -> Setup:
    """A row on a copy of the stories260K checkpoint folder changed by `edit(folder)`."""

    def setup(work: Path, shared: dict) -> dict:
        folder = Path(shutil.copytree(shared["stories"], work / "ckpt"))
        edit(folder)
        return {"ckpt": folder}

    return setup


def config_edit(**changes: Any) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "model_config.yaml"
        write_yaml(path, {**yaml.safe_load(path.read_text()), **changes})

    return edit


def file_setup(name: str, content: Callable[[Path, dict], Any]) -> Setup:
    """A row with one file `{file}` in its work folder: bytes, text, a tensor dict (safetensors) or a pickle."""

    def setup(work: Path, shared: dict) -> dict:
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        value = content(work, shared)
        if isinstance(value, bytes):
            path.write_bytes(value)
        elif isinstance(value, str):
            path.write_text(value)
        elif name.endswith(".safetensors"):
            save_file(value, path)
        else:
            torch.save(value, path)
        return {"file": path}

    return setup


def both(*setups: Setup) -> Setup:
    """A row with every one of `setups` (their template fields merged)."""

    def setup(work: Path, shared: dict) -> dict:
        fields: dict = {}
        for one in setups:
            fields.update(one(work, shared) or {})
        return fields

    return setup


class RunsCode:
    """A pickle that would call os.system when loaded without weights_only (it must be refused, never run)."""

    def __reduce__(self):
        import os

        return os.system, ("touch PWNED",)


def hostile(path: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": {}, "payload": RunsCode()}))


def hostile_torch_file(work: Path, shared: dict) -> bytes:
    """A real torch zip archive whose pickle asks for os.system."""
    torch.save({"weights": torch.zeros(2), "payload": RunsCode()}, work / "hostile.tmp")
    return (work / "hostile.tmp").read_bytes()


def run_copy(edit: Callable[[Path, dict], None]) -> Setup:
    """A row on a copy of the trained run folder (checkpoints/last.ckpt, step checkpoint) changed by `edit`."""

    def setup(work: Path, shared: dict) -> dict:
        run = Path(shutil.copytree(shared["run"], work / "run"))
        edit(run, shared)
        config = text_config(run, shared["stories"], shared["instructions"])
        return {"config": write_yaml(work / "fit.yaml", config), "copy": run}

    return setup


def truncate_last(run: Path, shared: dict) -> None:
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:3000])


def hostile_last(run: Path, shared: dict) -> None:
    last = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode()}, last)


def adapter_folder(edit: Callable[[Path], None]) -> Setup:
    """A row on a copy of the trained run's exported adapter (adapter.safetensors + adapter_config.yaml)."""

    def setup(work: Path, shared: dict) -> dict:
        folder = work / "adapter"
        folder.mkdir()
        for name in ("adapter.safetensors", "adapter_config.yaml"):
            shutil.copyfile(Path(shared["adapter"]) / name, folder / name)
        edit(folder)
        return {"adapter": folder}

    return setup


def adapter_config_edit(**changes: Any) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "adapter_config.yaml"
        data = yaml.safe_load(path.read_text())
        for key, value in changes.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        write_yaml(path, data)

    return edit


def meta_setup(drop: Optional[str] = None, params: Optional[str] = None, hostile: bool = False,
               **changed: torch.Tensor) -> Setup:
    """A row on a small Meta folder (random weights, `changed` replaced) with a file dropped or rewritten."""

    def setup(work: Path, shared: dict) -> dict:
        folder = meta_folder(work / "meta", **changed)
        if drop:
            (folder / drop).unlink()
        if params is not None:
            (folder / "params.json").write_text(params)
        if hostile:
            torch.save({"tok_embeddings.weight": torch.zeros(2), "payload": RunsCode()}, folder / "consolidated.00.pth")
        return {"meta": folder}

    return setup


def stories_bin(shared: dict) -> bytes:
    return (Path(shared["assets"]) / "stories260K" / "stories260K.bin").read_bytes()


def boom_expert(work: Path, shared: dict) -> dict:
    (work / "boom_expert.py").write_text(
        "class Boom:\n    def __init__(self):\n        raise RuntimeError('the expert broke')\n"
    )
    write_image(work / "cat.png")
    return {"pythonpath": str(work)}


EVIL_PICKLE = pickle.dumps({"x": RunsCode()})
GOOD_RECORD = {"instruction": "Say cat.", "output": "cat"}
OTHER_BASE = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16)
GEN = "generate --checkpoint_dir {stories}"
CONVERT_META = "convert {meta} --out_dir {work}/out --tokenizer {tokenizer}"
FIT = "fit --config {config}"
ROWS: dict[str, Row] = {
    # -- the command line itself --
    "unknown_command": Row("command", "generat --prompt hi", ("'generat'", "did you mean 'generate'")),
    "unknown_option": Row("option", GEN + " --top_kk 3", ("--top_kk: unknown option", "did you mean '--top_k'?")),
    "convert_dtype_float8": Row("option", "convert {assets}/stories260K/stories260K.bin --out_dir {work}/o "
                                "--dtype float8", ("--dtype", "float8", "bfloat16")),
    "convert_unknown_option": Row("option", "convert {assets}/stories260K/stories260K.bin --out_dirr {work}/o",
                                  ("--out_dirr: unknown option", "did you mean '--out_dir'?")),
    "generate_precision_fp8": Row("option", GEN + " --precision fp8", ("--precision", "fp8")),
    "generate_tokens_not_int": Row("option", GEN + " --max_new_tokens many", ("--max_new_tokens", "many")),
    "generate_temperature_word": Row("option", GEN + " --temperature hot", ("--temperature", "hot")),
    "merge_without_out_dir": Row("option", "merge --checkpoint_dir {stories} --adapter {adapter}", ("out_dir",)),
    "stop_without_value": Row("option", GEN + " --stop", ("--stop", "needs a value")),
    "chat_unknown_flag": Row("option", "chat --checkpoint_dir {stories} --prompts_file p.jsonl",
                             ("--prompts_file", "unknown")),
    "eval_unknown_benchmark": Row("option", "eval mmlu --data_dir {work}", ("mmlu",)),
    "eval_bad_split": Row("option", "eval scienceqa --data_dir {assets}/scienceqa --split dev", ("split", "dev")),
    "download_unknown_model": Row("option", "download nope-7b", ("nope-7b",)),
    # -- fit: options and config files --
    "fit_precision_fp8": Row("fit option", FIT + " --trainer.precision fp8", ("trainer.precision", "fp8"),
                             fit_setup()),
    "fit_unknown_option": Row("fit option", FIT + " --trainer.max_stepz 3",
                              ("--trainer.max_stepz", "did you mean '--trainer.max_steps'?"), fit_setup()),
    "fit_nested_yaml_typo": Row("fit option", FIT, ("{config}: model.adapter.adapter_lenn: unknown key",
                                                    "did you mean 'model.adapter.adapter_len'?"),
                                fit_setup(model__adapter__adapter_lenn=4)),
    "fit_top_level_typo": Row("fit option", FIT, ("{config}: trainr.max_steps", "did you mean 'trainer.max_steps'?"),
                              fit_setup(trainr={"max_steps": 1})),
    "fit_data_init_args_typo": Row("fit option", FIT, ("data_pathh",),
                                   fit_setup(data__instruction__init_args__data_pathh="x.json")),
    "fit_learning_rate_word": Row("fit option", FIT + " --model.learning_rate fast", ("model.learning_rate", "fast"),
                                  fit_setup()),
    "fit_config_not_found": Row("fit option", "fit --config {work}/nope.yaml", ("nope.yaml",)),
    "fit_config_bad_yaml": Row("fit option", "fit --config {file}", ("bad.yaml",),
                               file_setup("bad.yaml", lambda w, s: "trainer: [max_steps: 1\n")),
    "fit_bad_data_class": Row("fit option", FIT + " --data.instruction.class_path no.such.Module",
                              ("no.such.Module",), fit_setup()),
    "fit_adapter_len_zero": Row("fit option", FIT + " --model.adapter.adapter_len 0", ("adapter_len",), fit_setup()),
    "fit_bad_prompt_style": Row("fit option", FIT + " --model.adapter.prompt_style shakespeare", ("shakespeare",),
                                fit_setup()),
    "fit_max_steps_negative": Row("trainer", FIT + " --trainer.max_steps -5", ("trainer.max_steps", "-5"),
                                  fit_setup()),
    "fit_gpu_recipe_on_cpu": Row("trainer", "fit --config {repo}/configs/llama7b_v1_alpaca.yaml",
                                 ("trainer.accelerator", "llama7b_v1_alpaca.yaml", "no CUDA GPU",
                                  "--trainer.accelerator cpu"),
                                 env={"CUDA_VISIBLE_DEVICES": ""}),
    "fit_accelerator_tpu": Row("trainer", FIT + " --trainer.accelerator tpu", ("trainer.accelerator", "tpu"),
                               fit_setup()),
    "fit_devices_zero": Row("trainer", FIT + " --trainer.devices 0", ("trainer.devices",), fit_setup()),
    "fit_missing_checkpoint_dir": Row("trainer", FIT + " --model.checkpoint_dir {work}/nope",
                                      ("{work}/nope", "checkpoint folder not found"), fit_setup()),
    # -- fit: resuming --
    "resume_missing_file": Row("resume", FIT + " --ckpt_path {work}/nothere.ckpt",
                               ("--ckpt_path {work}/nothere.ckpt", "not found"), fit_setup()),
    "resume_truncated": Row("resume", FIT + " --ckpt_path last", ("{copy}/checkpoints/last.ckpt", "truncated"),
                            run_copy(truncate_last)),
    "resume_hostile_last": Row("resume", FIT + " --ckpt_path last",
                               ("{copy}/checkpoints/last.ckpt", "refused", "posix.system", "not a plain tensor"),
                               run_copy(hostile_last)),
    "resume_hostile_plain_pickle": Row("resume", FIT + " --ckpt_path {file}", ("{file}", "refused"),
                                       both(fit_setup(), file_setup("evil.ckpt", lambda w, s: EVIL_PICKLE))),
    "resume_not_a_checkpoint": Row("resume", FIT + " --ckpt_path {file}", ("{file}", "state_dict"),
                                   both(fit_setup(), file_setup("list.ckpt", lambda w, s: [torch.zeros(1)]))),
    "resume_other_adapter_len": Row("resume", FIT + " --ckpt_path {copy}/checkpoints/last.ckpt "
                                    "--model.adapter.adapter_len 6", ("last.ckpt", "adapter_len", "4", "6"),
                                    run_copy(lambda run, shared: None)),
    "validate_missing_ckpt": Row("resume", "validate --config {config} --ckpt_path {work}/nothere.ckpt",
                                 ("--ckpt_path {work}/nothere.ckpt",), fit_setup()),
    # -- fit: data --
    "data_file_missing": Row("data", FIT, ("{work}/nope.json",),
                             fit_setup(data__instruction__init_args__data_path="{work}/nope.json")),
    "data_malformed_json": Row("data", FIT, ("{data}", "malformed JSON"), data_setup(raw=b'[{"instruction": ')),
    "data_missing_field": Row("data", FIT, ("{data}", "record 1", "instruction"),
                              data_setup([{"instruction": "a", "output": "b"}, {"output": "c"}] * 4)),
    "data_empty_output": Row("data", FIT, ("{data}", "record 0", "output"),
                             data_setup([{"instruction": "a", "output": " "}, *[GOOD_RECORD] * 8])),
    "data_wrong_type": Row("data", FIT, ("{data}", "record 0", "instruction"),
                           data_setup([{"instruction": 3, "output": "b"}] * 8)),
    "data_not_a_list": Row("data", FIT, ("{data}", "list"), data_setup({"instruction": "a"})),
    "data_invalid_utf8": Row("data", FIT, ("{data}", "UTF-8"),
                             data_setup(raw=b'[{"instruction": "caf\xe9", "output": "b"}]')),
    "data_jsonl_bad_line": Row("data", FIT, ("{data}", "line 2"),
                               data_setup(raw=b'{"instruction": "a", "output": "b"}\n{"instruction": \n',
                                          name="data.jsonl")),
    "data_bad_on_bad_record": Row("data", FIT + " --data.instruction.init_args.on_bad_record ignore",
                                  ("on_bad_record", "ignore"), fit_setup()),
    "caption_image_missing": Row("data", FIT, ("{data}", "record 3", "missing.png"), caption_setup("missing")),
    "caption_not_an_image": Row("data", FIT, ("{data}", "record 3", "not_image.png"), caption_setup("not_image")),
    "caption_corrupt_body": Row("data", FIT, ("{data}", "record 3", "corrupt_body.png", "on_bad_record"),
                                caption_setup("corrupt_body")),
    "caption_file_missing": Row("data", FIT, ("{data}", "not found"), caption_setup("no_file")),
    # -- the checkpoint folder --
    "checkpoint_folder_missing": Row("checkpoint", "generate --checkpoint_dir {work}/none",
                                     ("{work}/none", "checkpoint folder not found")),
    "config_n_heads_zero": Row("checkpoint", "generate --checkpoint_dir {ckpt}",
                               ("{ckpt}/model_config.yaml", "n_heads", "0"), checkpoint_setup(config_edit(n_heads=0))),
    "config_dim_word": Row("checkpoint", "generate --checkpoint_dir {ckpt}",
                           ("{ckpt}/model_config.yaml", "dim", "sixty-four", "int"),
                           checkpoint_setup(config_edit(dim="sixty-four"))),
    "config_layers_negative": Row("checkpoint", "generate --checkpoint_dir {ckpt}",
                                  ("{ckpt}/model_config.yaml", "n_layers", "-1"),
                                  checkpoint_setup(config_edit(n_layers=-1))),
    "config_tie_string": Row("checkpoint", "generate --checkpoint_dir {ckpt}",
                             ("{ckpt}/model_config.yaml", "tie_embeddings", "bool"),
                             checkpoint_setup(config_edit(tie_embeddings="yes"))),
    "config_unknown_key": Row("checkpoint", "generate --checkpoint_dir {ckpt}",
                              ("{ckpt}/model_config.yaml", "n_headz"), checkpoint_setup(config_edit(n_headz=8))),
    "config_heads_not_dividing": Row("checkpoint", "generate --checkpoint_dir {ckpt}",
                                     ("{ckpt}/model_config.yaml", "n_kv_heads"),
                                     checkpoint_setup(config_edit(n_kv_heads=3))),
    "config_bad_yaml": Row("checkpoint", "generate --checkpoint_dir {ckpt}", ("{ckpt}/model_config.yaml", "YAML"),
                           checkpoint_setup(lambda f: (f / "model_config.yaml").write_text("dim: [64\n"))),
    "config_missing": Row("checkpoint", "generate --checkpoint_dir {ckpt}", ("{ckpt}/model_config.yaml", "missing"),
                          checkpoint_setup(lambda f: (f / "model_config.yaml").unlink())),
    "weights_missing": Row("checkpoint", "generate --checkpoint_dir {ckpt}", ("{ckpt}/model.safetensors", "missing"),
                           checkpoint_setup(lambda f: (f / "model.safetensors").unlink())),
    "weights_truncated": Row("checkpoint", "generate --checkpoint_dir {ckpt}",
                             ("{ckpt}/model.safetensors", "cannot read safetensors"),
                             checkpoint_setup(lambda f: (f / "model.safetensors").write_bytes(
                                 (f / "model.safetensors").read_bytes()[:-1000]))),
    "weights_other_model": Row("checkpoint", "generate --checkpoint_dir {ckpt}", ("{ckpt}/model.safetensors",),
                               checkpoint_setup(lambda f: save_file(random_state_dict(OTHER_BASE),
                                                                    f / "model.safetensors"))),
    "tokenizer_missing": Row("checkpoint", "generate --checkpoint_dir {ckpt}", ("{ckpt}/tokenizer.model",),
                             checkpoint_setup(lambda f: (f / "tokenizer.model").unlink())),
    # -- adapters --
    "adapter_not_found": Row("adapter", GEN + " --adapter {work}/none.safetensors", ("{work}/none.safetensors",)),
    "adapter_empty_alone": Row("adapter", GEN + " --adapter {file}", ("{file}", "empty"),
                               file_setup("x.safetensors", lambda w, s: b"")),
    "adapter_without_config": Row("adapter", GEN + " --adapter {file}", ("{file}", "adapter_config.yaml"),
                                  file_setup("x.safetensors", lambda w, s: {"a": torch.zeros(2)})),
    "adapter_folder_empty": Row("adapter", GEN + " --adapter {work}", ("{work}", "adapter.safetensors")),
    "adapter_not_ours": Row("adapter", GEN + " --adapter {adapter}", ("{adapter}/adapter_config.yaml", "format"),
                            adapter_folder(adapter_config_edit(format=None))),
    "adapter_other_base": Row("adapter", GEN + " --adapter {adapter}", ("{adapter}/adapter_config.yaml",
                                                                       "base model"),
                              adapter_folder(adapter_config_edit(base_model={"name": "llama-7b",
                                                                             "architecture_hash": "0" * 16}))),
    "adapter_config_bad_value": Row("adapter", GEN + " --adapter {adapter}", ("{adapter}/adapter_config.yaml",
                                                                             "adapter_len"),
                                    adapter_folder(adapter_config_edit(adapter_len=0))),
    "adapter_tensor_shape": Row("adapter", GEN + " --adapter {adapter}", ("{adapter}/adapter.safetensors", "shape"),
                                adapter_folder(lambda f: save_file(
                                    {"llama.layers.4.attention.adaption_prompt.prompt": torch.zeros(9, 64)},
                                    f / "adapter.safetensors"))),
    "adapter_corrupt": Row("adapter", GEN + " --adapter {adapter}", ("{adapter}/adapter.safetensors",
                                                                    "cannot read safetensors"),
                           adapter_folder(lambda f: (f / "adapter.safetensors").write_bytes(b"\x10" * 40))),
    "official_hostile_pth": Row("adapter", GEN + " --adapter {file}",
                                ("{file}", "refused", "posix.system", "not a plain tensor"),
                                file_setup("BIAS-7B.pth", hostile_torch_file)),
    "official_truncated_pth": Row("adapter", GEN + " --adapter {file}", ("{file}", "truncated"),
                                  file_setup("v1.pth", lambda w, s: b"PK\x03\x04" + b"\x00" * 200)),
    "official_foreign_keys": Row("adapter", GEN + " --adapter {file}", ("{file}", "not a LLaMA-Adapter file"),
                                 file_setup("other.pth", lambda w, s: {"encoder.weight": torch.zeros(2)})),
    "official_wrong_dim": Row("adapter", GEN + " --adapter {file}", ("{file}", "adapter_query.weight", "dim 64"),
                              file_setup("v1.pth", lambda w, s: {"adapter_query.weight": torch.zeros(20, 32)})),
    "merge_into_itself": Row("adapter", "merge --checkpoint_dir {stories} --adapter {adapter} --out_dir {stories}",
                             ("{stories}", "must differ")),
    "merge_hostile_adapter": Row("adapter", "merge --checkpoint_dir {stories} --adapter {file} --out_dir {work}/m",
                                 ("{file}", "refused"), file_setup("evil.pth", hostile_torch_file)),
    # -- devices --
    "device_tpu": Row("device", GEN + " --device tpu", ("--device tpu", "cpu, cuda")),
    "device_cuda_without_gpu": Row("device", GEN + " --device cuda", ("--device cuda", "no CUDA GPU"),
                                   env={"CUDA_VISIBLE_DEVICES": ""}),
    "device_bad_index": Row("device", GEN + " --device cuda:99", ("--device cuda:99",)),
    "device_garbage": Row("device", GEN + " --device gpu0", ("--device gpu0",)),
    # -- sampling --
    "top_k_negative": Row("sampling", GEN + " --top_k -3", ("--top_k -3", "at least 1")),
    "top_k_zero": Row("sampling", GEN + " --top_k 0", ("--top_k 0",)),
    "top_p_above_one": Row("sampling", GEN + " --top_p 1.5", ("--top_p 1.5",)),
    "top_p_nan": Row("sampling", GEN + " --top_p nan", ("--top_p", "nan")),
    "temperature_negative": Row("sampling", GEN + " --temperature -1", ("--temperature -1",)),
    "temperature_infinite": Row("sampling", GEN + " --temperature inf", ("--temperature", "inf")),
    "max_new_tokens_zero": Row("sampling", GEN + " --max_new_tokens 0", ("--max_new_tokens 0",)),
    "chat_top_k_negative": Row("sampling", "chat --checkpoint_dir {stories} --top_k -1", ("--top_k -1",),
                               stdin="hi\n"),
    # -- generate and chat inputs --
    "image_missing": Row("input", GEN + " --prompt hi --image {work}/nope.png", ("{work}/nope.png", "not found")),
    "image_corrupt_body": Row("input", GEN + " --prompt hi --image {file}", ("{file}", "cannot read image"),
                              file_setup("cut.png", lambda w, s: write_corrupt_body_png(w / "x.png").read_bytes())),
    "expert_without_image": Row("input", GEN + " --prompt hi --expert caption_file:{assets}/scienceqa/captions.json",
                                ("--expert", "--image")),
    "expert_unknown": Row("input", GEN + " --prompt hi --image {file} --expert wizard",
                          ("wizard", "unknown expert"), file_setup("cat.png", lambda w, s: b"")),
    "expert_caption_file_missing": Row("input", GEN + " --prompt hi --image {assets}/x.png "
                                       "--expert caption_file:{work}/none.json", ("{work}/none.json",)),
    "prompts_without_output": Row("input", GEN + " --prompts_file {work}/p.jsonl", ("p.jsonl", "--output_file")),
    "output_without_prompts": Row("input", GEN + " --output_file {work}/o.jsonl", ("o.jsonl", "--prompts_file")),
    "prompts_file_missing": Row("input", GEN + " --prompts_file {work}/p.jsonl --output_file {work}/o.jsonl",
                                ("{work}/p.jsonl", "not found")),
    "prompts_bad_line": Row("input", GEN + " --prompts_file {file} --output_file {work}/o.jsonl",
                            ("{file}:2", "not valid JSON"),
                            file_setup("p.jsonl", lambda w, s: '{"prompt": "a"}\n{"prompt": \n')),
    "prompts_batch_size_zero": Row("input", GEN + " --prompts_file {file} --output_file {work}/o.jsonl "
                                   "--batch_size 0", ("--batch_size 0",),
                                   file_setup("p.jsonl", lambda w, s: '{"prompt": "a"}\n')),
    "chat_image_missing": Row("input", "chat --checkpoint_dir {stories} --image {work}/nope.png",
                              ("{work}/nope.png", "not found"), stdin="hi\n"),
    # -- convert (a failed convert leaves nothing in {work}/out) --
    "convert_source_missing": Row("convert", "convert {work}/none --out_dir {work}/out",
                                  ("{work}/none", "not found")),
    "convert_params_missing": Row("convert", "convert {meta} --out_dir {work}/out", ("{meta}/params.json", "missing"),
                                  meta_setup(drop="params.json")),
    "convert_params_bad_json": Row("convert", CONVERT_META,
                                   ("{meta}/params.json", "invalid JSON"), meta_setup(params='{"dim": 32,')),
    "convert_meta_wrong_shape": Row("convert", CONVERT_META, ("{meta}/consolidated.00.pth", "expected [16, 32]",
                                                              "'layers.1.attention.wk.weight' has shape [12, 32]"),
                                    meta_setup(**{"layers.1.attention.wk.weight": torch.zeros(12, 32)})),
    "convert_meta_hostile": Row("convert", CONVERT_META, ("{meta}/consolidated.00.pth", "refused", "posix.system"),
                                meta_setup(hostile=True)),
    "convert_hf_wrong_shape": Row("convert", "convert {hf} --out_dir {work}/out --tokenizer {tokenizer}",
                                  ("{hf}/model.safetensors",
                                   "'model.layers.1.mlp.down_proj.weight' has shape [32, 10]"),
                                  lambda w, s: {"hf": hf_folder(w / "hf", **{
                                      "model.layers.1.mlp.down_proj.weight": torch.zeros(32, 10)})}),
    "convert_unknown_format": Row("convert", "convert {file} --out_dir {work}/out",
                                  ("{file}", "unknown checkpoint format"),
                                  file_setup("weights.npz", lambda w, s: b"\x93NUMPY not a checkpoint")),
    "convert_truncated_bin": Row("convert", "convert {file} --out_dir {work}/out --tokenizer {tokenizer}",
                                 ("{file}", "truncated llama2.c file"),
                                 file_setup("stories260K.bin", lambda w, s: stories_bin(s)[:500_000])),
    "convert_without_tokenizer": Row("convert", "convert {file} --out_dir {work}/out",
                                     ("{file}", "no tokenizer.model found", "--tokenizer"),
                                     file_setup("model/stories260K.bin", lambda w, s: stories_bin(s))),
    # -- evaluation --
    "eval_data_dir_missing": Row("eval", "eval scienceqa --data_dir {work}/none --checkpoint_dir {stories}",
                                 ("{work}/none", "not found")),
    "eval_limit_zero": Row("eval", "eval scienceqa --data_dir {assets}/scienceqa --limit 0", ("--limit",)),
    "eval_no_checkpoint": Row("eval", "eval scienceqa --data_dir {assets}/scienceqa --output {work}/e",
                              ("--checkpoint_dir",)),
    "eval_outputs_missing": Row("eval", "eval scienceqa --data_dir {assets}/scienceqa --outputs_file {work}/o.json "
                                "--output {work}/e", ("{work}/o.json",)),
}


# rows that print an error but are not user errors: an exception of the command's own, as one line + the debug hint
FAULT_ROWS: dict[str, Row] = {
    "unexpected_exception": Row("fault", GEN + " --prompt hi --image {work}/cat.png --expert boom_expert:Boom",
                                ("RuntimeError", "the expert broke", "LIT_ADAPTER_DEBUG=1"), boom_expert, code=1),
}
# rows that succeed but must say one thing clearly
NOTICE_ROWS: dict[str, Row] = {
    # no checkpoint yet: the run starts from scratch (a requeued job can always pass `last`), and says so once
    "resume_last_without_checkpoint": Row("notice", FIT + " --ckpt_path last", ("--ckpt_path last",
                                                                              "starts from scratch"),
                                          fit_setup(), code=0),
    # a damaged image body is caught while preparing, so `skip` can skip it (and counts it)
    "caption_corrupt_body_skipped": Row("notice", FIT, ("captions.jsonl", "1 skipped", "unreadable image"),
                                        caption_setup("corrupt_body", on_bad_record="skip"), code=0),
    "debug_traceback": Row("notice", GEN + " --prompt hi --image {work}/cat.png --expert boom_expert:Boom",
                           ("Traceback", "the expert broke"), boom_expert, code=1, env={"LIT_ADAPTER_DEBUG": "1"}),
}
# run both forked and as plain subprocesses: the same exit status and stderr
SUBPROCESS_ROWS = ("unknown_option", "resume_hostile_last", "unexpected_exception")


# ---- running the table ----


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's private cache (as the `private_cache` fixture sets it for in-process tests)."""
    return tmp_path_factory.getbasetemp() / "lit-adapter-cache"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, assets: Path, stories260k_dir: Path, instructions: Path,
           cache: Path) -> dict:
    """The folders every row may use, and the one real training run (one step) that resume rows start from."""
    root = tmp_path_factory.mktemp("shared")
    folders = {"assets": assets, "stories": stories260k_dir, "instructions": instructions,
               "tokenizer": assets / "stories260K" / "tok512.model"}
    run = root / "run"
    config = text_config(run, stories260k_dir, instructions, export_adapter=True)
    result = run_cli("fit", "--config", write_yaml(root / "fit.yaml", config), env={"LIT_ADAPTER_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "adapter.safetensors").is_file()
    return {**folders, "run": run, "adapter": run}


def prepare(name: str, row: Row, root: Path, shared: dict) -> dict:
    work = root / name
    work.mkdir()
    fields = {**{k: str(v) for k, v in shared.items()}, "work": str(work), "repo": str(REPO)}
    if row.setup is not None:
        fields.update({k: str(v) for k, v in (row.setup(work, fields) or {}).items()})
    _format_config(fields)
    argv = [part.format(**fields) for part in shlex.split(row.argv)]
    out = work / ".out"
    out.mkdir()
    request = {"argv": argv, "cwd": str(work), "env": row.env, "stdin": row.stdin, "out": str(out),
               "pythonpath": [fields["pythonpath"]] if "pythonpath" in fields else []}
    return {"request": request, "fragments": [f.format(**fields) for f in row.fragments], "work": work}


def _format_config(fields: dict) -> None:
    """A written config may hold templates too (`{work}/nope.json`): fill them in."""
    if "config" in fields:
        path = Path(fields["config"])
        path.write_text(path.read_text().replace("{work}", fields["work"]))


REPO = Path(__file__).resolve().parents[1]
ALL_ROWS = {**ROWS, **FAULT_ROWS, **NOTICE_ROWS}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory, shared: dict, cache: Path) -> dict:
    root = tmp_path_factory.mktemp("rows")
    prepared = {name: prepare(name, row, root, shared) for name, row in ALL_ROWS.items()}
    for item in prepared.values():
        item["request"]["env"] = {"LIT_ADAPTER_CACHE": str(cache), **item["request"]["env"]}
    codes, seconds, import_output = run_batch([item["request"] for item in prepared.values()], workers=3)
    assert import_output == "", f"importing the package prints something: {import_output}"
    results = {}
    for (name, item), code, took in zip(prepared.items(), codes, seconds, strict=True):
        out = Path(item["request"]["out"])
        results[name] = {**item, "code": code, "seconds": took, "stderr": (out / "stderr").read_text(),
                         "stdout": (out / "stdout").read_text()}
    return results


class Result:
    """What assert_cli_error reads from a finished process."""

    def __init__(self, code: int, stderr: str) -> None:
        self.returncode, self.stderr = code, stderr


@pytest.mark.parametrize("name", list(ROWS))
def test_cli_error(name: str, outcomes: dict) -> None:
    outcome = outcomes[name]
    line = assert_cli_error(Result(outcome["code"], outcome["stderr"]), *outcome["fragments"])
    print(f"[{ROWS[name].kind}] {name} ({outcome['seconds']:.1f} s): {line}")
    out = outcome["work"] / "out"
    assert not out.exists() or not any(out.iterdir()), "a failed command left files behind"
    assert not (outcome["work"] / "PWNED").exists() and not (REPO / "PWNED").exists(), "a pickle ran code"


@pytest.mark.parametrize("name", list(FAULT_ROWS))
def test_unexpected_exception_is_one_line_with_the_debug_hint(name: str, outcomes: dict) -> None:
    outcome = outcomes[name]
    assert outcome["code"] == 1, outcome["stderr"]
    lines = outcome["stderr"].strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in outcome["stderr"], outcome["stderr"]
    for fragment in outcome["fragments"]:
        assert fragment in lines[0], (fragment, lines[0])


def test_resume_last_without_a_checkpoint_says_so_in_one_line(outcomes: dict) -> None:
    outcome = outcomes["resume_last_without_checkpoint"]
    assert outcome["code"] == 0, outcome["stderr"]
    mentions = [line for line in outcome["stderr"].splitlines() if "ckpt_path" in line or "last checkpoint" in line]
    assert mentions == [f"--ckpt_path last: no checkpoint in {outcome['work']}/run/checkpoints yet, so this run starts "
                        "from scratch"], outcome["stderr"]
    assert (outcome["work"] / "run" / "checkpoints" / "last.ckpt").is_file()  # and it trained


def test_corrupt_caption_image_is_skipped_and_counted(outcomes: dict) -> None:
    outcome = outcomes["caption_corrupt_body_skipped"]
    assert outcome["code"] == 0, outcome["stderr"]
    printed = outcome["stdout"] + outcome["stderr"]
    assert "captions.jsonl: 3 records kept, 1 skipped (1 unreadable image)" in printed, printed


def test_debug_variable_shows_the_traceback(outcomes: dict) -> None:
    outcome = outcomes["debug_traceback"]
    assert outcome["code"] == 1 and "Traceback" in outcome["stderr"] and "the expert broke" in outcome["stderr"]


@pytest.mark.parametrize("name", SUBPROCESS_ROWS)
def test_forked_rows_match_real_processes(name: str, outcomes: dict) -> None:
    """The forked runner is faithful: a plain `python -m lit_adapter.cli` process prints the same."""
    outcome = outcomes[name]
    request = outcome["request"]
    env = {**request["env"], **({"PYTHONPATH": ":".join([*request["pythonpath"], str(REPO)])}
                                if request["pythonpath"] else {})}
    result = run_cli(*request["argv"], stdin=request["stdin"], env=env, fresh=True)
    assert (result.returncode, result.stderr) == (outcome["code"], outcome["stderr"])


def test_enough_rows() -> None:
    assert len(ROWS) > 69
