"""One tokenizer interface over SentencePiece (`tokenizer.model`) and Hugging Face `tokenizers` (`tokenizer.json`).

A checkpoint folder holds one of the two files, and may hold the Hugging Face files that describe it (its
*companions*): `tokenizer_config.json` (named special tokens, `add_bos_token`, the chat template),
`special_tokens_map.json`, `chat_template.jinja` (where newer checkpoints keep the template) and
`generation_config.json` (the ids that end a generation: Llama 3 Instruct stops on `<|eot_id|>` as well as on
`<|end_of_text|>`). Special tokens written in the text (`<|im_start|>`, a template's `<s>`) become their ids, as
transformers encodes them; `encode` adds BOS only when asked, and only where the tokenizer's own default would (a
tokenizer.json's post-processor: Llama 3 has one, Qwen and Falcon none).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from lit_adapter.errors import LitAdapterError, first_line
from lit_adapter.files import atomic_path, read_json

SENTENCEPIECE_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
# the tokenizer files a checkpoint folder may hold, in order of preference (SentencePiece keeps the ids of the
# checkpoints converted before tokenizer.json was supported)
TOKENIZER_FILES = (SENTENCEPIECE_FILE, HF_TOKENIZER_FILE)
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
COMPANION_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_FILE, GENERATION_CONFIG)
# the named special tokens transformers hands a chat template (`bos_token`, ...)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

PathLike = Union[str, Path]


def find_tokenizer_file(folder: PathLike) -> Optional[Path]:
    """The folder's tokenizer.model, else its tokenizer.json, else None."""
    for name in TOKENIZER_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def tokenizer_files(path: PathLike) -> list[Path]:
    """The tokenizer file and the companions beside it: every file whose content changes the tokens."""
    path = Path(path)
    return [path, *(path.parent / name for name in COMPANION_FILES if (path.parent / name).is_file())]


def copy_tokenizer(path: PathLike, out_dir: PathLike) -> Path:
    """Copy a tokenizer file (under its standard name) and its companions into `out_dir`; the other kind of
    tokenizer file is removed there, so that the folder holds one tokenizer."""
    path, out_dir = Path(path), Path(out_dir)
    name = HF_TOKENIZER_FILE if path.suffix == ".json" else SENTENCEPIECE_FILE
    target = out_dir / name
    for source, destination in [(path, target), *((p, out_dir / p.name) for p in tokenizer_files(path)[1:])]:
        if source.resolve() != destination.resolve():
            with atomic_path(destination) as tmp:
                shutil.copyfile(source, tmp)
    for other in TOKENIZER_FILES:
        if other != name and (out_dir / other).is_file() and path.parent.resolve() != out_dir.resolve():
            (out_dir / other).unlink()
    return target


class _SentencePiece:
    """tokenizer.model through sentencepiece; control pieces written in the text (`<s>`) are split out."""

    def __init__(self, path: Path) -> None:
        from sentencepiece import SentencePieceProcessor

        try:
            self.processor = SentencePieceProcessor(model_file=str(path))
        except Exception as err:  # sentencepiece raises a bare RuntimeError/OSError
            raise LitAdapterError(f"{path}: not a valid SentencePiece model ({first_line(err)})") from None
        self.vocab_size = self.processor.vocab_size()
        self.specials: dict[str, int] = {}
        self._pattern: Optional[re.Pattern] = None

    def defaults(self) -> dict[str, Any]:
        ids = {"bos_token": self.processor.bos_id(), "eos_token": self.processor.eos_id(),
               "unk_token": self.processor.unk_id(), "pad_token": self.processor.pad_id()}
        return {name: self.processor.id_to_piece(i) for name, i in ids.items() if i >= 0}

    def default_bos(self) -> Optional[int]:
        return self.processor.bos_id() if self.processor.bos_id() >= 0 else None

    def token_id(self, token: str) -> Optional[int]:
        index = self.processor.piece_to_id(token)
        return index if self.processor.id_to_piece(index) == token else None

    def set_specials(self, tokens: Iterable[str]) -> None:
        self.specials = {t: i for t in tokens if t and (i := self.token_id(t)) is not None}
        self.added = list(self.specials)
        longest_first = sorted(self.specials, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, longest_first))) if longest_first else None

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        ids, starts = [], []
        position = 0
        for match in [*(self._pattern.finditer(text) if self._pattern else ()), None]:
            end = match.start() if match else len(text)
            if end > position:
                part_ids, part_starts = self._encode_plain(text[position:end])
                ids += part_ids
                starts += [position + s for s in part_starts]
            if match:
                ids.append(self.specials[match.group()])
                starts.append(match.start())
                position = match.end()
        return ids, starts

    def _encode_plain(self, text: str) -> tuple[list[int], list[int]]:
        pieces = self.processor.encode(text, out_type="proto").pieces
        char_of_byte = _char_of_byte(text)
        return [p.id for p in pieces], [char_of_byte[min(p.begin, len(char_of_byte) - 1)] for p in pieces]

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


class _HFTokenizers:
    """tokenizer.json through the `tokenizers` library (byte-level BPE, Metaspace, WordPiece, ...)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tokenizer = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise LitAdapterError(f"{path}: not a valid Hugging Face tokenizer.json ({first_line(err)})") from None
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.added = [token.content for token in self.tokenizer.get_added_tokens_decoder().values()]

    def defaults(self) -> dict[str, Any]:
        return {}

    def default_bos(self) -> Optional[int]:
        """The id the tokenizer's post-processor puts before a text (Llama 3's `<|begin_of_text|>`), if any."""
        plain = self.tokenizer.encode("a", add_special_tokens=False).ids
        framed = self.tokenizer.encode("a", add_special_tokens=True).ids
        for start in range(len(framed) - len(plain) + 1):
            if framed[start : start + len(plain)] == plain:
                return framed[0] if start == 1 else None
        return None

    def token_id(self, token: str) -> Optional[int]:
        return self.tokenizer.token_to_id(token)

    def set_specials(self, tokens: Iterable[str]) -> None:
        """tokens.json's added tokens are split out of the text by `tokenizers` itself."""

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return list(encoding.ids), [start for start, _ in encoding.offsets]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class Tokenizer:
    """Encode and decode with explicit BOS/EOS control; `stop_ids` end a generation, `special_tokens` and
    `chat_template` are what the checkpoint's chat template renders with (see `lit_adapter.chat_template`).

    Args:
        path: a SentencePiece `tokenizer.model`, a Hugging Face `tokenizer.json`, or a folder holding one.
    """

    def __init__(self, path: PathLike) -> None:
        path = Path(path)
        if path.is_dir():
            path = find_tokenizer_file(path) or path / SENTENCEPIECE_FILE
        if not path.is_file():
            raise LitAdapterError(
                f"{path}: tokenizer file not found; pass a SentencePiece `tokenizer.model` or a Hugging Face "
                "`tokenizer.json`"
            )
        self.path = path
        self.backend = _HFTokenizers(path) if path.suffix == ".json" else _SentencePiece(path)
        config = read_companions(path.parent)
        self.special_tokens: dict[str, str] = {**self.backend.defaults(), **config["special_tokens"]}
        self.backend.set_specials([*self.special_tokens.values(), *config["added_specials"]])
        self.chat_template: Optional[Union[str, dict[str, str]]] = config["chat_template"]
        self.chat_template_file: Path = config["chat_template_file"]
        # the tokens written as text that are one id each (a chat template's <|im_start|>, <s>, ...)
        self.control_tokens: tuple[str, ...] = tuple(self.backend.added)
        self.bos_id = self._bos_id(config["add_bos_token"])
        self.eos_id = self._named_id("eos_token")
        self.pad_id = self._named_id("pad_token")
        eos_ids = [self.eos_id, *config["eos_token_ids"]]
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        if self.eos_id is None and self.stop_ids:
            self.eos_id = self.stop_ids[0]

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def _named_id(self, name: str) -> Optional[int]:
        token = self.special_tokens.get(name)
        return self.backend.token_id(token) if token else None

    def _bos_id(self, add_bos_token: Optional[bool]) -> Optional[int]:
        # tokenizer.json's post-processor decides, as in transformers' PreTrainedTokenizerFast (which reads no
        # add_bos_token); a SentencePiece model puts its BOS first unless tokenizer_config.json says otherwise
        if add_bos_token is None or isinstance(self.backend, _HFTokenizers):
            return self.backend.default_bos()
        return self._named_id("bos_token") if add_bos_token else None

    def token_id(self, token: str) -> Optional[int]:
        """The id of one token (e.g. a special token such as `<|im_end|>`), None when the vocabulary lacks it."""
        return self.backend.token_id(token)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`; BOS first (when the tokenizer has one by default) and EOS last on request."""
        ids = self.backend.encode_with_offsets(text)[0]
        return self._framed(ids, bos, eos)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of `text` (no BOS/EOS) and, for each, the index of the character where it starts."""
        return self.backend.encode_with_offsets(text)

    def _framed(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special tokens left out."""
        return self.backend.decode([int(i) for i in ids])


def read_companions(folder: Path) -> dict[str, Any]:
    """What the Hugging Face files beside a tokenizer say (each missing file says nothing)."""
    config = _json_object(folder / TOKENIZER_CONFIG)
    token_map = _json_object(folder / SPECIAL_TOKENS_MAP)
    generation = _json_object(folder / GENERATION_CONFIG)
    special_tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        token = _token_text(config.get(name, token_map.get(name)))
        if token:
            special_tokens[name] = token
    added = config.get("added_tokens_decoder") if isinstance(config.get("added_tokens_decoder"), dict) else {}
    added_specials = [_token_text(t) for t in added.values() if isinstance(t, dict) and t.get("special")]
    template, template_file = _chat_template(folder, config)
    eos_ids = generation.get("eos_token_id")
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    add_bos = config.get("add_bos_token")
    return {
        "special_tokens": special_tokens,
        "added_specials": [t for t in added_specials if t],
        "chat_template": template,
        "chat_template_file": template_file,
        "add_bos_token": add_bos if isinstance(add_bos, bool) else None,
        "eos_token_ids": [i for i in eos_ids if isinstance(i, int) and not isinstance(i, bool)],
    }


def _chat_template(folder: Path, config: dict) -> tuple[Optional[Union[str, dict[str, str]]], Path]:
    """chat_template.jinja when present (transformers prefers it), else tokenizer_config.json's `chat_template`:
    one template, or named ones (a list of {"name", "template"} or a mapping)."""
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8"), folder / CHAT_TEMPLATE_FILE
    template = config.get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict) and not all(isinstance(v, str) for v in template.values()):
        raise LitAdapterError(f"{folder / TOKENIZER_CONFIG}: 'chat_template' holds a named template that is not text")
    if template is not None and not isinstance(template, (str, dict)):
        raise LitAdapterError(f"{folder / TOKENIZER_CONFIG}: 'chat_template' must be a Jinja template string")
    return template, folder / TOKENIZER_CONFIG


def _json_object(path: Path) -> dict:
    return read_json(path, path.name, expect=dict) if path.is_file() else {}


def _token_text(value: Any) -> Optional[str]:
    """A token as tokenizer_config.json writes it: a string or an AddedToken object {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _char_of_byte(text: str) -> list[int]:
    """For each UTF-8 byte offset of `text` (and its end), the index of the character it falls in."""
    index = []
    for position, char in enumerate(text):
        index += [position] * len(char.encode("utf-8"))
    return [*index, len(text)]
