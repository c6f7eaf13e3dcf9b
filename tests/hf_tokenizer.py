"""Hugging Face tokenizers made in the test with the `tokenizers` library: byte-level BPE as Llama 3 and Qwen2 ship
it (their pre-tokenizer split patterns, ByteLevel bytes, Llama 3's BOS post-processor), trained on a small English +
Chinese + emoji corpus, saved as a checkpoint-style folder (tokenizer.json + tokenizer_config.json +
generation_config.json) that transformers' `PreTrainedTokenizerFast.from_pretrained` reads as well."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

# the split patterns of the published tokenizer.json files (Llama 3 groups up to three digits, Qwen2 one)
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = _WORDS + r"\p{N}{1,3}" + _REST
QWEN2_SPLIT = _WORDS + r"\p{N}" + _REST

ENGLISH = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine.",
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital.",
    "Give three tips for staying healthy: eat well, sleep enough and exercise every day.",
    "Translate the sentence into Chinese, please. Write a short poem about the sea and the moon.",
]
CHINESE = [
    "从前，有一个名叫莉莉的小女孩。她喜欢在阳光下玩耍。",
    "中国的首都是北京。法国的首都是巴黎。请用中文回答这个问题。",
    "保持健康的三个建议：吃得好，睡得足，每天锻炼身体。",
    "写一首关于大海和月亮的短诗。你好，世界！今天天气很好，我们去公园散步吧。",
    "机器学习是人工智能的一个分支，它让计算机从数据中学习规律。",
]
EMOJI = ["I love pizza 🍕 and coffee ☕! 🚀🌕 你好😀", "Flags 🇨🇳🇺🇸 and families 👨‍👩‍👧 are several code points."]
CORPUS = ENGLISH + CHINESE + EMOJI


def train_byte_level_bpe(
    texts: Iterable[str], special_tokens: Iterable[str], vocab_size: int = 700, split: str = LLAMA3_SPLIT,
    bos: Optional[str] = None,
):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts`; `bos` set: a post-processor that puts it first
    (as Llama 3's tokenizer.json does), else none (as Qwen2's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(list(texts), trainer)
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:
        steps.append(processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tokenizer.token_to_id(bos))],
        ))
    tokenizer.post_processor = processors.Sequence(steps)
    return tokenizer


def save_tokenizer_folder(
    folder: Path, tokenizer, bos: Optional[str], eos: str, chat_template: Optional[str] = None,
    eos_token_ids: Optional[list[int]] = None, pad: Optional[str] = None, **config,
) -> Path:
    """tokenizer.json + tokenizer_config.json (+ generation_config.json with `eos_token_ids`) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
                "pad_token": pad, "clean_up_tokenization_spaces": False, "model_max_length": 4096, **config}
    if chat_template is not None:
        settings["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, ensure_ascii=False, indent=2))
    if eos_token_ids is not None:
        generation = {"bos_token_id": tokenizer.token_to_id(bos) if bos else None, "eos_token_id": eos_token_ids}
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder / "tokenizer.json"


def transformers_tokenizer(folder: Path):
    """The independent reference: transformers' fast tokenizer loaded from the same folder."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder))
