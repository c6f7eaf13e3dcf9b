"""Meta's Llama 3 `tokenizer.model`: a tiktoken BPE file (one `base64-token rank` line per token), not SentencePiece.

It becomes the Hugging Face files our tokenizer reads, as Meta's own `Tokenizer` defines them: transformers'
`TikTokenConverter` (byte-level BPE with the ranks as merges) under Meta's split pattern, then Meta's 256 special
tokens after the ranks (`<|begin_of_text|>` first; the ids of the named ones are those of every Llama 3.x),
`tokenizer_config.json` (BOS, EOS, Meta's chat format as a chat template) and `generation_config.json` (a generation
ends on `<|end_of_text|>`, `<|eom_id|>` or `<|eot_id|>`, Meta's stop tokens). Needs `tiktoken` and `transformers`
(`pip install tiktoken transformers`), imported only here.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from lit_adapter.errors import LitAdapterError
from lit_adapter.files import write_json

PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
           r"\s+(?!\S)|\s+")
NAMED_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>")
NUM_SPECIALS = 256
STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
# Meta's ChatFormat: each message is a header with its role, "\n\n", the stripped content and <|eot_id|>; the prompt
# starts with BOS and ends with the assistant's header
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def special_tokens() -> list[str]:
    """Meta's special tokens in id order (they follow the BPE ranks)."""
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIALS - len(NAMED_SPECIALS))]
    return [*NAMED_SPECIALS, *reserved]


def is_tiktoken_file(path: Path) -> bool:
    """Whether `path` starts like a tiktoken BPE file (a SentencePiece model is a binary protobuf)."""
    try:
        with open(path, "rb") as file:
            first = file.readline(4096).split()
    except OSError:
        return False
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def write_hf_tokenizer(path: Path, folder: Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json for the tiktoken file `path` into
    `folder`; returns the tokenizer.json."""
    try:
        import tiktoken  # noqa: F401  (TikTokenConverter reads the file with it)
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError:
        raise LitAdapterError(f"{path}: a Llama 3 tiktoken tokenizer is converted with tiktoken and transformers; "
                              "pip install tiktoken transformers") from None
    specials = special_tokens()
    try:
        tokenizer = TikTokenConverter(vocab_file=str(path), pattern=PATTERN,
                                      extra_special_tokens=specials).converted()
    except (ValueError, OSError) as err:
        raise LitAdapterError(f"{path}: cannot read the tiktoken BPE file ({err})") from None
    ids = {token: tokenizer.token_to_id(token) for token in specials}
    tokenizer.post_processor = bos_first(tokenizer.post_processor, ids["<|begin_of_text|>"])
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "tokenizer.json"
    tokenizer.save(str(out))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True,
              "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}
    write_json(config, folder / "tokenizer_config.json")
    generation = {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": [ids[t] for t in STOP_TOKENS]}
    write_json(generation, folder / "generation_config.json")
    return out


def bos_first(byte_level, bos_id: int):
    """The post-processor that puts `<|begin_of_text|>` before a text (what Meta's `encode(bos=True)` does, and
    where our tokenizer finds its BOS), after the byte-level one."""
    from tokenizers import processors

    bos = "<|begin_of_text|>"
    template = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                             special_tokens=[(bos, bos_id)])
    return processors.Sequence([byte_level, template])
