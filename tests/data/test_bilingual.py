"""English + Chinese instruction tuning end to end: a mixed data file (English Alpaca records, Chinese records that
name the `alpaca_zh` template themselves, a Chinese conversation in messages form), a byte-level BPE trained here on
that data (Chinese covered, some characters left in several byte tokens), a tiny Qwen2-shaped model (q/k/v biases,
rope theta 1e6, tied embeddings, no BOS, the Qwen2.5 ChatML template); `lit-adapter fit`, then `generate` and `chat`
print the Chinese answers exactly, streamed without a broken character."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lit_adapter.adapters import AdapterConfig
from lit_adapter.checkpoint import save_checkpoint
from lit_adapter.cli import main
from lit_adapter.config import ModelConfig
from lit_adapter.data.instruction import InstructionDataModule
from lit_adapter.files import load_yaml
from lit_adapter.prompts import ALPACA_ZH
from lit_adapter.tokenizer import Tokenizer
from tests.chat_templates import QWEN2_5
from tests.helpers import random_state_dict, run_cli
from tests.hf_tokenizer import QWEN2_SPLIT, save_tokenizer_folder, train_byte_level_bpe
from tests.training.helpers import write_config

ZH_QUESTION, ZH_ANSWER = "中国的首都是哪里？", "中国的首都是北京。鹦鹉🦜会说话。"
ZH_GREETING, ZH_REPLY = "你好！", "你好！我是一个会说中文的小模型。🙂"
ZH_RECORDS = [
    {"instruction": ZH_QUESTION, "output": ZH_ANSWER, "prompt_style": "alpaca_zh"},
    {"messages": [{"role": "user", "content": ZH_GREETING}, {"role": "assistant", "content": ZH_REPLY}]},
]
OTHER_ZH = [
    {"instruction": "写一句关于大海的话。", "output": "大海很蓝，也很大。", "prompt_style": "alpaca_zh"},
    {"instruction": "把这句话翻译成英文。", "input": "我喜欢猫。", "output": "I like cats.",
     "prompt_style": "alpaca_zh"},
]


@pytest.fixture(scope="module")
def run(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bilingual")
    english = json.loads((assets / "alpaca" / "alpaca_data_200.json").read_text())[:6]
    records = english + OTHER_ZH + ZH_RECORDS * 6  # the two Chinese answers often enough to be learned
    data = root / "bilingual.json"
    data.write_text(json.dumps(records, ensure_ascii=False))

    # the tokenizer is trained on the data and its templates; a small vocabulary leaves the rarer characters
    # (鹦鹉, the emoji) in several byte tokens
    texts = [json.dumps(r, ensure_ascii=False) for r in records] + [ALPACA_ZH.with_input, QWEN2_5.source]
    hf = train_byte_level_bpe(texts, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab_size=420,
                              split=QWEN2_SPLIT)
    stops = [hf.token_to_id("<|im_end|>"), hf.token_to_id("<|endoftext|>")]
    tokenizer_file = save_tokenizer_folder(root / "tokenizer", hf, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                                           chat_template=QWEN2_5.source, eos_token_ids=stops, add_bos_token=False)
    config = ModelConfig(name="tiny-qwen2", vocab_size=hf.get_vocab_size(), dim=64, n_layers=2, n_heads=4,
                         n_kv_heads=2, hidden_dim=128, max_seq_len=256, norm_eps=1e-6, rope_theta=1e6,
                         linear_bias=["wq", "wk", "wv"], tie_embeddings=True)
    checkpoint = save_checkpoint(root / "checkpoint", random_state_dict(config), config, tokenizer_file)

    adapter = AdapterConfig.v2(adapter_len=4, lora_rank=8, lora_alpha=16, prompt_style="chat_template")
    fit = {
        "seed_everything": 3,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 90,
                    "default_root_dir": str(root / "run"), "enable_progress_bar": False, "logger": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0},
        "model": {"checkpoint_dir": str(checkpoint), "adapter": adapter.to_dict(), "learning_rate": 0.02,
                  "weight_decay": 0.0, "warmup_steps": 0},
        "data": {"instruction": {"class_path": "lit_adapter.data.instruction.InstructionDataModule",
                                 "init_args": {"data_path": str(data), "max_seq_length": 128, "batch_size": 8,
                                               "val_split": 0}}},
    }  # fmt: skip
    from lit_adapter.training.cli import fit_main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: extra threads only wait on a shared machine
    try:
        fit_main(["--config", str(write_config(root / "fit.yaml", fit))])
    finally:
        torch.set_num_threads(threads)
    return {"checkpoint": checkpoint, "adapter": root / "run", "data": data}


def test_the_answers_hold_characters_split_over_tokens(run: dict[str, Path]) -> None:
    tokenizer = Tokenizer(run["checkpoint"])
    for text in (ZH_ANSWER, ZH_REPLY):
        pieces = [tokenizer.decode([i]) for i in tokenizer.encode(text, bos=False)]
        assert any("\ufffd" in piece for piece in pieces), pieces  # so that streaming has something to get wrong


class Recorder:
    """sys.stdout stand-in keeping every write, to see the stream piece by piece."""

    def __init__(self) -> None:
        self.pieces: list[str] = []

    def write(self, text: str) -> int:
        self.pieces.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_fit_then_generate_prints_the_chinese_answer_streamed(run: dict[str, Path], monkeypatch) -> None:
    assert load_yaml(run["adapter"] / "adapter_config.yaml")["prompt_style"] == "chat_template"
    recorder = Recorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    main(["generate", "--checkpoint_dir", str(run["checkpoint"]), "--adapter", str(run["adapter"]),
          "--prompt", ZH_QUESTION, "--prompt_style", "alpaca_zh", "--temperature", "0", "--max_new_tokens", "40",
          "--device", "cpu", "--precision", "32-true"])  # fmt: skip
    assert "".join(recorder.pieces) == ZH_ANSWER + "\n"
    assert len(recorder.pieces) > 4 and not any("\ufffd" in piece for piece in recorder.pieces)


def test_fit_then_chat_prints_the_chinese_reply(run: dict[str, Path]) -> None:
    """The real command on a pipe: the adapter's template (the checkpoint's ChatML), UTF-8 out."""
    result = run_cli("chat", "--checkpoint_dir", run["checkpoint"], "--adapter", run["adapter"], "--temperature", "0",
                     "--max_new_tokens", "40", "--device", "cpu", stdin=f"{ZH_GREETING}\n", timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ZH_REPLY + "\n"


def test_the_chinese_template_per_record_and_per_data_set(run: dict[str, Path], tmp_path: Path) -> None:
    tokenizer = Tokenizer(run["checkpoint"])
    records = OTHER_ZH
    per_record = InstructionDataModule(str(run["data"]), tokenizer_path=tokenizer.path, prompt_style="chat_template",
                                       val_split=0, cache_dir=tmp_path / "cache")
    per_record.setup()
    zh = tmp_path / "zh.json"
    zh.write_text(json.dumps([{k: v for k, v in r.items() if k != "prompt_style"} for r in records],
                             ensure_ascii=False))
    per_set = InstructionDataModule(str(zh), tokenizer_path=tokenizer.path, prompt_style="alpaca_zh", val_split=0,
                                    cache_dir=tmp_path / "cache")
    per_set.setup()
    for index, record in enumerate(records):
        prompt = ALPACA_ZH.apply(record["instruction"], record.get("input", ""))
        expected = tokenizer.encode(prompt + record["output"], bos=True, eos=True)  # no BOS in this tokenizer
        for module, row in ((per_record, 6 + index), (per_set, index)):
            sample = module.train_dataset[row]
            assert sample["input_ids"].tolist() == expected
            labels = sample["labels"][sample["labels"] != -100].tolist()
            assert tokenizer.decode(labels) == record["output"] and labels[-1] == tokenizer.eos_id
